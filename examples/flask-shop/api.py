"""The shop's API: a plain Flask application factory. portmesh starts it on a port it
allocated (`flask run --port {port}`, or gunicorn on a socket portmesh binds and hands over)."""

import os

from flask import Flask, jsonify

PRODUCTS = [
    {"id": 1, "name": "teapot", "price": 18},
    {"id": 2, "name": "mug", "price": 6},
]


def create_app():
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return {"status": "ok", "service": "api", "port": os.environ.get("PORT")}

    @app.get("/api/products")
    def products():
        return jsonify(PRODUCTS)

    return app
