"""The deploy kit as files: the Dockerfile and compose.yaml parse, and agree
with the command line (every flag they pass exists, the port they publish is
the one the server listens on, the data volume is the data directory)."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

import app

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = text.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def exec_form(argument: str) -> list[str]:
    return yaml.safe_load(argument)  # a JSON array is YAML too


def test_the_dockerfile_builds_a_cuda_image_that_serves_as_a_user_on_its_data_volume():
    steps = dockerfile()
    first = steps[0]
    assert first[0] == "FROM" and first[1].startswith("nvidia/cuda:") and "runtime" in first[1]
    kinds = [k for k, _ in steps]
    assert set(kinds) <= {"FROM", "RUN", "ENV", "WORKDIR", "COPY", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK",
                          "ENTRYPOINT", "CMD"}
    user = [a for k, a in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD")
    env = dict(part.split("=", 1) for k, a in steps if k == "ENV" for part in shlex.split(a))
    volumes = [a for k, a in steps if k == "VOLUME"]
    assert volumes == [env["CHATBOT_DATA_DIR"]] == ["/data"]
    assert env["HF_HOME"].startswith("/data/")  # the model cache survives a new container
    # torch's CUDA build is installed before the project, so that pip keeps it
    installs = [a for k, a in steps if k == "RUN" and "pip install" in a]
    assert "download.pytorch.org/whl/cu" in installs[0] and "'.[quantize]'" in installs[1]

    command = exec_form(next(a for k, a in steps if k == "ENTRYPOINT")) + exec_form(next(a for k, a in steps
                                                                                          if k == "CMD"))
    assert command[:2] == ["python3", "app.py"]
    args = app.build_parser().parse_args(command[2:])  # every flag exists
    assert args.command == "serve" and args.host == "0.0.0.0"
    exposed = [int(a) for k, a in steps if k == "EXPOSE"]
    assert exposed == [args.port]
    health = next(a for k, a in steps if k == "HEALTHCHECK")
    assert f"http://127.0.0.1:{args.port}/healthz" in health and "--start-period=" in health


def test_compose_runs_that_image_on_a_gpu_with_its_secrets_from_an_env_file_and_the_data_volume():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    service = compose["services"]["chatbot"]
    assert service["build"] == "."
    args = app.build_parser().parse_args(service["command"])  # every flag exists
    assert args.command == "serve" and args.host == "0.0.0.0"
    published = [p.rsplit(":", 1)[1] for p in service["ports"]]
    assert published == [str(args.port)]
    # the image's data directory is the named volume
    env = dict(part.split("=", 1) for k, a in dockerfile() if k == "ENV" for part in shlex.split(a))
    mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
    assert mounts[env["CHATBOT_DATA_DIR"]] in compose["volumes"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # the admin token comes from the env file, whose example names what app.py reads
    assert service["env_file"] == ["chatbot.env"]
    example = (ROOT / "chatbot.env.example").read_text(encoding="utf-8")
    assert f"{app.ADMIN_TOKEN_ENV}=" in example
    assert "chatbot.env" in (ROOT / ".gitignore").read_text() and "chatbot.env" in (ROOT / ".dockerignore").read_text()
    health = " ".join(service["healthcheck"]["test"])
    assert f"http://127.0.0.1:{args.port}/healthz" in health
