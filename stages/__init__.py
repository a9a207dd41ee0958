"""imagemill's curation stages.

`stages/core/` holds each stage's plain-Python core (no Beam) and `stages/models/` the
models (no Beam); each module here is the thin Beam adapter of one stage, named by its
role: `read`, `url`, `caption`, `crawl`, `resolution` (decode), `staging`, `dedup`,
`clip_score`, `safety`, `aesthetic`, `inference` (what the model stages share),
`select`, `recaption`, `shards`; `base` is what every adapter shares (the rejects
side output and its metrics)."""
