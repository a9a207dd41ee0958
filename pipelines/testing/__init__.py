"""Demo and test aids, not part of the pipelines: a local web server that serves
generated images on loopback addresses (`localweb`) and the generated corpus the
demo and the end-to-end tests crawl (`webcorpus`). Nothing in `pipelines/`,
`stages/` or `trainer/` imports this package."""
