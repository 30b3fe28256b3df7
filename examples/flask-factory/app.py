"""A Flask app factory with the portmesh extension: run it alone and it takes its own port.

    pip install ./python flask        # from the repository root, in a venv
    python examples/flask-factory/app.py

The extension holds the app's sticky port (the same one on every start while nobody else holds
it) for the life of the process, registers the app with a `/healthz` check, and `app.run()`
listens there: no port number in the code. Settings come from `FLASK_*` variables as usual
(`FLASK_PORTMESH_POOL=web`, `FLASK_PORTMESH_KEY=greeter/web`). Under `portmesh run` or
`portmesh up` it takes the port they give instead and holds nothing itself.
"""

from flask import Flask

from portmesh.flask import PortMesh

pm = PortMesh()


def create_app():
    app = Flask("greeter")
    app.config["PORTMESH_HEALTHZ"] = True
    app.config.from_prefixed_env()
    pm.init_app(app)

    @app.get("/")
    def hello():
        return {"hello": "world", "port": app.config["PORTMESH_PORT"]}

    return app


if __name__ == "__main__":
    create_app().run()
