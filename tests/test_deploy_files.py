"""The container files in deploy/ start exactly the commands the CLI documents, with TLS on and one data volume per
site (Docker and Kubernetes are not installed here: the files are parsed, and each command is parsed by the CLI's
own argument parser)."""
import copy
import shlex
from pathlib import Path

import pytest
import yaml

from fl_crew_reddit.main import COMMANDS, build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SITES = ["site-0", "site-1", "site-2"]


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _k8s() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / "flcrew.yaml").read_text()) if doc]


def _containers(docs: list[dict]) -> dict[str, dict]:
    found = {}
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = {**container, "_pod": pod, "_doc": doc}
    return found


def check_command(args: list[str]) -> None:
    """`args` is a command of our CLI with options it accepts, and never without TLS."""
    assert "--insecure" not in args, f"TLS off in a deployment file: {args}"
    assert args and args[0] in COMMANDS, f"{args[:1]} is not a command of python -m fl_crew_reddit.main"
    try:
        build_parser().parse_args(args)
    except SystemExit as error:
        raise AssertionError(f"the CLI rejects {shlex.join(args)}") from error


def test_dockerfile_runs_the_cli_as_a_user_with_the_model_inside():
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    assert 'ENTRYPOINT ["python", "-m", "fl_crew_reddit.main"]' in lines
    assert any(line.startswith("FROM python:3.11") for line in lines)
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert any("prepare-model" in line for line in lines)
    assert any("pip install -r requirements.txt" in line for line in lines)


def test_compose_starts_the_documented_commands_with_tls_and_a_volume_per_site():
    services = _compose()["services"]
    for service in services.values():
        check_command(service["command"])
    certs = services["certs"]["command"]
    assert certs[certs.index("--sites") + 1].split(",") == SITES
    assert "superlink" in certs[certs.index("--hosts") + 1].split(",")  # the name the sites dial
    data_volumes = []
    for site in SITES:
        command = services[site]["command"]
        assert command[:3] == ["site", "--name", site] and "--certs" in command
        assert command[command.index("--superlink") + 1] == "superlink:9092"
        (data,) = [v for v in services[site]["volumes"] if v.endswith(":/data")]
        data_volumes.append(data.split(":")[0])
        assert any(v.endswith(":/certs:ro") for v in services[site]["volumes"])
    assert len(set(data_volumes)) == len(SITES)  # each site its own data
    # the run and the SuperLink share the job folders at the same path; the run reaches the Control API over TLS
    assert "server:/srv/flcrew" in services["server"]["volumes"]
    assert "server:/srv/flcrew" in services["superlink"]["volumes"]
    env = services["server"]["environment"]
    assert env["FEDERATION"] == "flower" and env["FLOWER_CERTS"] == "/certs"
    assert env["SUPERLINK_ADDRESS"] == "superlink:9093" and env["FL_CREW_REDDIT_DIR"] == "/srv/flcrew"


def test_kubernetes_manifest_starts_the_documented_commands():
    containers = _containers(_k8s())
    assert set(containers) == {"Deployment/superlink", "StatefulSet/site", "Job/run"}
    for container in containers.values():
        args = [a.replace("$(SITE_NAME)", "site-0") for a in container["args"]]
        check_command(args)
    site = containers["StatefulSet/site"]
    assert site["_doc"]["spec"]["replicas"] == len(SITES)  # pods site-0, site-1, site-2: the certs' site names
    assert [t["metadata"]["name"] for t in site["_doc"]["spec"]["volumeClaimTemplates"]] == ["data"]
    mounts = {m["mountPath"]: m["name"] for m in site["volumeMounts"]}
    assert mounts["/data"] == "data"
    server, superlink = containers["Job/run"], containers["Deployment/superlink"]
    shared = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert shared["/srv/flcrew"] == {m["mountPath"]: m["name"] for m in superlink["volumeMounts"]}["/srv/flcrew"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["FEDERATION"] == "flower" and env["FLOWER_CERTS"] == "/certs"


def test_the_checks_can_fail():
    services = copy.deepcopy(_compose()["services"])
    services["site-0"]["command"] = [*services["site-0"]["command"], "--insecure"]
    with pytest.raises(AssertionError, match="TLS off"):
        check_command(services["site-0"]["command"])
    with pytest.raises(AssertionError, match="not a command"):
        check_command(["serve-everything"])
    with pytest.raises(AssertionError, match="rejects"):
        check_command(["site", "--name", "site-0", "--data-dir", "/data", "--superlink", "x:9092", "--tls"])
