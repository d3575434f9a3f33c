# Read by CMake right after llama.cpp's own project() call when llama-cpp-python is compiled
# (tools/setup.sh passes it as CMAKE_PROJECT_llama.cpp_INCLUDE). llama-cpp-python switches on
# llama.cpp's "common" library, which only its command-line tools use; the Python bindings load
# libllama and libggml alone. Turning it off here skips about half of the compile.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp: build the common library (tools only)" FORCE)
