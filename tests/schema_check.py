#!/usr/bin/env python3
"""Validates policy files against the JSON Schema of deploy/schema/policy.schema.json.

    python3 tests/schema_check.py SCHEMA --valid FILE... --invalid FILE...

YAML (.yaml, .yml) is read with PyYAML, with the dates YAML 1.1 would turn into date
objects kept as the strings they are in YAML 1.2 (what entitled and editors read);
JSON as JSON; NDJSON line by line against the customer schema. Prints one line per
file that is not what it was said to be, and exits 1 if there is any.
"""

import datetime
import json
import sys

try:
    import jsonschema
    import yaml
except ImportError as e:  # the test must fail, not skip, without the modules
    sys.stderr.write(f"schema_check: {e}; pip install jsonschema pyyaml\n")
    sys.exit(2)


class Yaml12Loader(yaml.SafeLoader):
    """Timestamps stay strings, as in YAML 1.2."""


Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}


def documents(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".ndjson"):
        return [("customer", json.loads(line)) for line in text.splitlines() if line.strip()]
    if path.endswith(".json"):
        return [("file", json.loads(text))]
    return [("file", yaml.load(text, Loader=Yaml12Loader) or {})]


def errors(schema, path):
    validator = jsonschema.Draft202012Validator(schema)
    customer = jsonschema.Draft202012Validator(
        {"$ref": "#/$defs/customer", "$defs": schema["$defs"]}
    )
    out = []
    try:
        docs = documents(path)
    except Exception as e:  # noqa: BLE001 - unreadable is invalid
        return [f"unreadable: {e}"]
    for kind, doc in docs:
        v = customer if kind == "customer" else validator
        out.extend(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in v.iter_errors(doc))
    return out


def main(argv):
    schema = json.load(open(argv[1], encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    mode, problems = None, []
    for arg in argv[2:]:
        if arg in ("--valid", "--invalid"):
            mode = arg
            continue
        errs = errors(schema, arg)
        if mode == "--valid" and errs:
            problems.append(f"{arg}: should validate, but: {errs[0]}")
        if mode == "--invalid" and not errs:
            problems.append(f"{arg}: should not validate, but does")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
