"""A hit counter: Flask in front of a real Redis server that `portmesh up` starts first, on a
port it allocated. REDIS_URL is built in portmesh.toml from the cache's port."""

import os

import redis
from flask import Flask


def create_app():
    app = Flask(__name__)
    store = redis.Redis.from_url(os.environ["REDIS_URL"])

    @app.get("/health")
    def health():
        store.ping()
        return {"status": "ok", "redis": os.environ["REDIS_URL"]}

    @app.get("/")
    def hit():
        return {"hits": store.incr("hits")}

    return app
