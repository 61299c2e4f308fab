"""`zimage-lite serve`: the warm model behind an HTTP API (DESIGN.md §10).

Data flow: routes (routes_openai.py, routes_jobs.py) validate a request (schemas.py) into `JobParams`
(params.py), the device worker (worker.py) runs one `Job` (jobs.py) at a time from its bounded queue on
the engine (engine.py: the Pipeline plus the reuse parts of reuse.py), and outputs become files or base64
(outputs.py, files.py). app.py composes them; ray_app.py deploys the same app on Ray Serve; cli.py is the
`serve` subcommand. FastAPI and uvicorn come with the `serve` extra; importing this package imports none.
"""
