"""`loratune ui`: a local web app to plan, start, watch, compare and try runs.

It reads run folders as the CLI writes them and starts the CLI as child processes (`loratune train`, `loratune
merge`, `loratune export`): it never trains by itself, so every run it starts is an ordinary run folder the CLI can
resume.

    main.py     `serve`: the address, the token when exposed, the URL printed
    server.py   the Starlette app: the JSON API, server-sent events, the static page
    guard.py    the token, the Host header and the write header, on every request
    runs.py     what a run folder says: state, numbers, metrics (tolerant of half-written files)
    jobs.py     child processes: start, stop (SIGINT, like Ctrl-C), resume, merge, export; their records and logs
    form.py     the new-run form: fields, the Guide's warnings, plan and data inspection, the command line
    tryit.py    a worker process that answers prompts with the fine-tuned and the base model, streaming tokens
    static/     the page (plain JavaScript, no build step) and the vendored chart library (uPlot)
"""
