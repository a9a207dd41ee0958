"""Demo and test aids, not part of the pipelines: a local web server that serves
generated images on loopback addresses (`localweb`), a web of many hosts on
127.0.0.2+ that logs every request per host (`manyhosts`), the generated corpus the demo
and the end-to-end tests crawl (`webcorpus`), the synthetic images of the demo, the
tests and the benchmarks (`images`), and tiny CLIP, LLaVA and embedding-head models
built offline (`models`). Only the demo, the tests and the benchmarks import this
package."""
