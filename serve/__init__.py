"""The Ray Serve app over tpv, split along its seams:

- `serve.app`: the HTTP ingress deployment (FastAPI), `build()` and `app`, the import path of serve/config.yaml;
- `serve.model`: the model deployment (backbone, store, prompt cache, `@serve.batch`), called through a handle;
- `serve.batching`: per-composition prompt cache and one forward for mixed compositions (no Ray import);
- `serve.errors` (one error table and JSON shape), `serve.guards` (key check, body size/time bounds),
  `serve.auth` (API keys), `serve.inputs` (templates), `serve.limits`, `serve.schemas` (HTTP),
  `serve.settings` (the two user_configs), `serve.jobs` (ingress -> model messages), `serve.cli` (`tpv serve`).
Importing this package imports nothing heavy; `serve.app` and `serve.model` import Ray."""
