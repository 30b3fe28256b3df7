"""See scripts/k8s-manifests."""
import json
import os
import re
import sys

import kubernetes_validate
import yaml

KUBERNETES = "1.31.0"


def resources(folder):
    """The files the kustomization in `folder` lists, each checked to exist, and every other
    YAML file of the folder named (a manifest left out of the kustomization is a mistake)."""
    with open(os.path.join(folder, "kustomization.yaml")) as f:
        listed = yaml.safe_load(f)["resources"]
    problems = [f"{r}: listed in kustomization.yaml but missing" for r in listed
                if not os.path.exists(os.path.join(folder, r))]
    for name in sorted(os.listdir(folder)):
        if name.endswith((".yaml", ".yml")) and name != "kustomization.yaml" and name not in listed:
            problems.append(f"{name}: not listed in kustomization.yaml resources")
    return listed, problems


def validate(folder):
    listed, problems = resources(folder)
    for r in listed:
        path = os.path.join(folder, r)
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                try:
                    kubernetes_validate.validate(doc, KUBERNETES, strict=True)
                    print(f"ok {r}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {KUBERNETES}, strict)")
                except kubernetes_validate.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    problems.append(f"{r}: {doc.get('kind')} {where}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    problems.append(f"{r}: no schema for {e}")
    for p in problems:
        print(f"error {p}", file=sys.stderr)
    return 1 if problems else 0


def pod(name, namespace, folder="k8s"):
    with open(os.path.join(folder, "statefulset.yaml")) as f:
        sts = yaml.safe_load(f)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    fields = {"metadata.name": name, "metadata.namespace": namespace}
    env, secret_env = {}, {}
    for e in container.get("env", []):
        source = e.get("valueFrom", {})
        if "value" in e:
            # Kubernetes expands $(VAR) from variables defined earlier in the list.
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif "fieldRef" in source:
            env[e["name"]] = fields[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret_env[e["name"]] = {"secret": ref["name"], "key": ref["key"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"].get("volumes", [])}
    # Secrets mounted as files: mount path -> {secret, items (key -> path), or every key}.
    secret_mounts = {}
    for m in container.get("volumeMounts", []):
        secret = volumes.get(m["name"], {}).get("secret")
        if secret:
            items = {i["key"]: i["path"] for i in secret.get("items", [])}
            secret_mounts[m["mountPath"]] = {"secret": secret["secretName"], "items": items}
    print(json.dumps({"args": container.get("args", []), "env": env, "secret_env": secret_env,
                      "secret_mounts": secret_mounts,
                      "grace_seconds": sts["spec"]["template"]["spec"].get("terminationGracePeriodSeconds")}))
    return 0


def main(argv):
    if len(argv) >= 1 and argv[0] == "validate":
        return validate(argv[1] if len(argv) > 1 else "k8s")
    if len(argv) == 3 and argv[0] == "pod":
        return pod(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
