"""The blog's site (module `front`; `site` is a Python standard module): renders posts it fetches from the posts service, whose address it reads
from POSTS_URL (set in portmesh.toml from the posts service's `http` port)."""

import json
import os
import urllib.request

from flask import Flask


def fetch(path):
    with urllib.request.urlopen(os.environ["POSTS_URL"] + path, timeout=5) as r:
        return json.load(r)


def create_app():
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return {"status": "ok", "service": "site"}

    @app.get("/")
    def index():
        posts = [fetch(f"/posts/{slug}") for slug in fetch("/posts")]
        items = "".join(f"<article><h2>{p['title']}</h2><p>{p['body']}</p></article>" for p in posts)
        return f"<h1>Blog</h1>{items}"

    return app
