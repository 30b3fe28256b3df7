"""The blog's posts service: a Flask application factory with a JSON API."""

import os

from flask import Flask, abort, jsonify

POSTS = {
    "hello": {"slug": "hello", "title": "Hello, portmesh", "body": "No port was picked by hand."},
    "ports": {"slug": "ports", "title": "Sticky ports", "body": "Same port after every restart."},
}


def create_app():
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return {"status": "ok", "service": "posts", "port": os.environ.get("PORT_HTTP")}

    @app.get("/posts")
    def index():
        return jsonify(sorted(POSTS))

    @app.get("/posts/<slug>")
    def post(slug):
        if slug not in POSTS:
            abort(404)
        return jsonify(POSTS[slug])

    return app
