"""``loracli serve``: trained runs behind one HTTP server, with a page to try them.

``backend`` is the one module that touches the rest of loracli (loading runs, inputs,
mixed-adapter forwards, generation); ``batching`` groups requests into forwards; ``gate``
holds the settings, the shared state and the gate every request passes; ``app`` and
``completions`` the routes; ``server`` runs them on uvicorn; ``page/`` is the page at ``GET /``.
"""
