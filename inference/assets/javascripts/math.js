// Formulas: pymdownx.arithmatex (generic mode) wraps $...$ in \( \) and $$...$$ in \[ \]
// inside span/div.arithmatex; KaTeX (a local copy, assets/katex/) typesets them. Material's
// document$ fires on every page load, including instant navigation.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,   // a formula KaTeX cannot parse shows in red (the browser test looks for it)
  })
})
