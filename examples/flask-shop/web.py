"""The shop's web front. It finds the API through the variables portmesh sets: API_URL, built
in portmesh.toml from the API's port, and API_PORT, which every service of the stack gets."""

import json
import os
import urllib.request

from flask import Flask


def api_url():
    return os.environ.get("API_URL") or f"http://127.0.0.1:{os.environ['API_PORT']}"


def create_app():
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return {"status": "ok", "service": "web", "api": api_url()}

    @app.get("/")
    def index():
        with urllib.request.urlopen(f"{api_url()}/api/products", timeout=5) as r:
            products = json.load(r)
        items = "".join(f"<li>{p['name']}: {p['price']}</li>" for p in products)
        return f"<h1>Shop</h1><ul>{items}</ul><p>served by the API at {api_url()}</p>"

    return app
