"""The Ray Serve app over tpv: `serve.app` (deployment + FastAPI ingress, `main` for `tpv serve`),
`serve.batching` (per-composition prompt cache, one forward for a batch of mixed compositions; no Ray import),
`serve.schemas` (request/response models and the replica's user_config). Importing this package imports nothing
heavy; `serve.app` imports Ray."""
