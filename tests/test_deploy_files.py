"""deploy/: the Dockerfile, the Compose file and the Kubernetes manifest start exactly the commands the CLI documents,
with TLS on, one data volume per site, and the run sharing the SuperLink's volume at the same path.

Docker and Kubernetes are not installed here: the files are parsed (the Dockerfile line by line, the YAML with
yaml.safe_load), every command is parsed by the CLI's own argument parser, and the run's environment by the
configuration class. Each check is a function of the parsed file, so `test_the_checks_can_fail` feeds it broken copies.
"""
import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fl_crew_reddit.config import FLCrewRedditConfig
from fl_crew_reddit.main import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SITES = ["site-0", "site-1", "site-2"]
SHARED = "/srv/flcrew"
READY = "superlink-ready"  # the health check the Dockerfile installs
PLACEHOLDERS = {"$(SITE_NAME)": "site-0"}  # Kubernetes expands it from the downward API


# --- reading the files
def dockerfile_instructions(text: str) -> list[tuple[str, str, str]]:
    """(INSTRUCTION, arguments, heredoc body) of each instruction: continuation lines joined, comments dropped."""
    lines, instructions, index = text.splitlines(), [], 0
    while index < len(lines):
        line = lines[index].strip()
        index += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and index < len(lines):
            line = line[:-1].rstrip() + " " + lines[index].strip()
            index += 1
        keyword, _, rest = line.partition(" ")
        body = []
        if "<<" in rest:  # COPY <<'EOF' target ... EOF
            marker = rest.split("<<", 1)[1].split()[0].strip("'\"-")
            while index < len(lines) and lines[index] != marker:
                body.append(lines[index])
                index += 1
            index += 1
        instructions.append((keyword.upper(), rest.strip(), "\n".join(body) + ("\n" if body else "")))
    return instructions


def dockerfile_text() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def k8s() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / "flcrew.yaml").read_text()) if doc]


def ready_script(text: str) -> str:
    (body,) = [body for keyword, rest, body in dockerfile_instructions(text)
               if keyword == "COPY" and rest.endswith(f"/usr/local/bin/{READY}")]
    return body


def check_ready(args: list[str]):
    """`args` (after the script's name) are accepted by the image's superlink-ready."""
    namespace = {"__name__": "superlink_ready"}  # its definitions only: main() is not called
    exec(compile(ready_script(dockerfile_text()), READY, "exec"), namespace)
    try:
        return namespace["build_parser"]().parse_args(args)
    except SystemExit as error:
        raise AssertionError(f"{READY} rejects {shlex.join(args)}") from error


# --- the checks, each a function of the parsed files
def strings(node):
    """Every string in a parsed YAML document, keys included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def check_tls_on(node) -> None:
    """No `--insecure` and no FLOWER_INSECURE anywhere (a flag, an environment entry, a shell line)."""
    off = [s for s in strings(node) if "--insecure" in s or "FLOWER_INSECURE" in s.upper()]
    assert not off, f"TLS off in a deployment file: {off}"


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {shlex.join(args)}"
    return args[args.index(name) + 1]


def check_cli(args: list[str]):
    """`args` names a command of python -m fl_crew_reddit.main, and the CLI's own parser accepts every option."""
    args = [PLACEHOLDERS.get(arg, arg) for arg in args]
    assert args and args[0] in COMMANDS, f"{args[:1]} is not a command of python -m fl_crew_reddit.main ({COMMANDS})"
    try:
        return build_parser().parse_args(args)
    except SystemExit as error:
        raise AssertionError(f"the CLI rejects {shlex.join(args)}") from error


def check_run_environment(env: dict[str, str], control: str, certs_mount: str) -> FLCrewRedditConfig:
    """The run's variables are settings of FLCrewRedditConfig, and together a valid FEDERATION=flower configuration
    that reaches the SuperLink's Control API with the federation's certificates and keeps its results on SHARED."""
    unknown = [name for name in env if name.lower() not in FLCrewRedditConfig.model_fields]
    assert not unknown, f"not settings of fl_crew_reddit/config.py: {unknown}"
    config = FLCrewRedditConfig(_env_file=None, **{name.lower(): value for name, value in env.items()})
    assert config.federation == "flower"
    assert config.superlink_address == control, f"SUPERLINK_ADDRESS={config.superlink_address}, not {control}"
    assert str(config.flower_certs) == certs_mount
    assert str(config.fl_crew_reddit_dir) == SHARED, "the run's folder (results/, its job folders) is not shared"
    return config


def check_dockerfile(text: str) -> None:
    check_tls_on(text.splitlines())
    instructions = dockerfile_instructions(text)
    keywords = [keyword for keyword, _, _ in instructions]
    assert any(k == "FROM" and rest.startswith("python:3.11-slim") for k, rest, _ in instructions), "not python:3.11"
    entrypoints = [rest for k, rest, _ in instructions if k == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["python", "-m", "fl_crew_reddit.main"], \
        f"ENTRYPOINT {entrypoints} is not the CLI"
    for k, rest, _ in instructions:
        if k == "CMD":
            arguments = json.loads(rest)
            if arguments != ["--help"]:
                check_cli(arguments)
    env = " ".join(rest for k, rest, _ in instructions if k == "ENV").split()
    for setting in ("HF_HUB_OFFLINE=1", "FLWR_TELEMETRY_ENABLED=0"):
        assert setting in env, f"ENV {setting} missing"
    users = [index for index, keyword in enumerate(keywords) if keyword == "USER"]
    assert users, "the image runs as root"
    last_user = instructions[users[-1]][1]
    assert last_user.split(":")[0] not in ("root", "0"), f"the image runs as {last_user}"
    runs = [(index, rest) for index, (k, rest, _) in enumerate(instructions) if k == "RUN"]
    assert any("pip install -r requirements.txt" in rest for _, rest in runs), "requirements.txt not installed"
    (model,) = [index for index, rest in runs if "fl_crew_reddit.main prepare-model" in rest]
    assert model > users[-1], "prepare-model runs before USER: the model lands in root's cache, not the user's"
    # `flwr run` needs federation/flower_app/pyproject.toml, which a plain (non-editable) install leaves out unless
    # the package data lists it
    package_data = " ".join((ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1:])
    assert any("pip install" in rest and " -e ." in rest for _, rest in runs) or "flower_app" in package_data, \
        "the installed package lacks the Flower app folder"
    compile(ready_script(text), READY, "exec")


def volume_mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """{container path: (volume, read-only)} of a compose service's short-syntax volumes."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        mounts[target] = (source, "ro" in mode)
    return mounts


def check_compose(document: dict) -> None:
    services = document["services"]
    check_tls_on(document)
    declared = set(document.get("volumes") or {})
    for name, service in services.items():
        check_cli(service["command"])
        for source, _ in volume_mounts(service).values():
            assert source in declared, f"{name} mounts {source}, not a named volume of the file"

    certs = services["certs"]
    certs_args = certs["command"]
    assert certs_args[0] == "certs"
    out = option(certs_args, "--out")
    if "entrypoint" in certs:  # a shell that skips an existing CA must still run the CLI with these arguments
        assert 'exec python -m fl_crew_reddit.main "$$@"' in certs["entrypoint"][2], "certs does not run the CLI"
    sites_listed = option(certs_args, "--sites").split(",")
    hosts = option(certs_args, "--hosts").split(",")
    assert volume_mounts(certs)[out][1] is False, "certs cannot write its folder"
    certs_volume = volume_mounts(certs)[out][0]

    superlink = services["superlink"]
    link = check_cli(superlink["command"])
    for name, service in services.items():
        if name != "certs":
            mount = {target: m for target, m in volume_mounts(service).items() if m[0] == certs_volume}
            assert mount and all(read_only for _, read_only in mount.values()), f"{name}: certificates not read-only"

    sites = {name: s for name, s in services.items() if s["command"][0] == "site"}
    assert sorted(sites) == sorted(sites_listed) == SITES, f"site services {sorted(sites)} vs --sites {sites_listed}"
    data_volumes = {}
    for name, site in sites.items():
        args = check_cli(site["command"])
        assert args.name == name, f"service {name} runs site --name {args.name}"
        assert args.certs is not None and str(args.certs) in volume_mounts(site), f"{name}: no certificates"
        host, _, port = args.superlink.rpartition(":")
        assert host == "superlink" and host in hosts and int(port) == link.fleet_port, \
            f"{name} dials {args.superlink}: not the SuperLink's Fleet API in its certificate ({hosts})"
        source, read_only = volume_mounts(site)[str(args.data_dir)]
        assert not read_only
        data_volumes[name] = source
        assert site["env_file"] == [{"path": f"sites/{name}.env", "required": False}], f"{name}: its own env_file"
        assert site["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert len(set(data_volumes.values())) == len(sites), f"sites share a data volume: {data_volumes}"
    for name, service in services.items():
        for source, _ in volume_mounts(service).values():
            owners = [site for site, volume in data_volumes.items() if volume == source]
            assert not owners or owners == [name], f"{name} mounts {owners}'s data volume {source}"

    assert superlink["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    health = superlink["healthcheck"]["test"]
    assert health[:2] == ["CMD", READY], f"the SuperLink's health check {health}"
    probe = check_ready(health[2:])
    assert probe.host in hosts and probe.state == str(link.state) and probe.certs == str(link.certs)
    assert probe.ports.split(",") == [str(link.fleet_port), str(link.control_port)]

    server = services["server"]
    assert check_cli(server["command"]).command == "run"
    check_run_environment(server["environment"], f"superlink:{link.control_port}", str(link.certs))
    assert "superlink" in hosts
    assert server["depends_on"]["superlink"]["condition"] == "service_healthy"
    # the ServerApp (in the SuperLink's process tree) reads the round's job folder that `run` writes: same volume,
    # same path
    shared = volume_mounts(server).get(SHARED)
    assert shared is not None and shared == volume_mounts(superlink).get(SHARED), \
        f"server and superlink do not share one volume at {SHARED}"
    assert str(link.state).startswith(SHARED + "/"), "the SuperLink's state is not kept on its volume"


def containers(docs: list[dict]) -> dict[str, dict]:
    """{kind/name/container: container} of every pod template, init containers included (each with `_pod`)."""
    found = {}
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            found[f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"] = {**container, "_pod": pod}
    return found


def k8s_mounts(container: dict) -> dict[str, tuple[str, bool]]:
    """{path: (volume source, read-only)}: a claim's or a secret's name, or a volumeClaimTemplate's name."""
    volumes = {v["name"]: v for v in container["_pod"].get("volumes", [])}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        source = (volume.get("persistentVolumeClaim", {}).get("claimName")
                  or volume.get("secret", {}).get("secretName") or f"template:{mount['name']}")
        mounts[mount["mountPath"]] = (source, bool(mount.get("readOnly")))
    return mounts


def k8s_certs_command(text: str) -> list[str]:
    """The `certs` command the manifest's header tells the operator to run (its certificates become the Secret)."""
    (line,) = [line for line in text.splitlines() if line.startswith("#") and "fl_crew_reddit.main certs" in line]
    return shlex.split(line.lstrip("# "))[3:]


def check_k8s(docs: list[dict], certs_command: list[str]) -> None:
    check_tls_on(docs)
    certs = check_cli(certs_command)
    hosts = certs.hosts.split(",")
    by_kind = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    namespace = by_kind.get(("Namespace", "flcrew"))
    assert namespace is not None, "no Namespace"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "flcrew", f"{doc['kind']}/{doc['metadata']['name']}"
    found = containers(docs)
    for key, container in found.items():
        if "command" in container:  # replaces the entrypoint: only the image's health check may do that
            assert container["command"][0] == READY, f"{key} runs {container['command']}, not the CLI"
            check_ready(container["command"][1:])
        else:
            check_cli(container["args"])
        for source, read_only in k8s_mounts(container).values():
            if source == "flcrew-certs":
                assert read_only, f"{key}: certificates not read-only"

    superlink = found["Deployment/superlink/superlink"]
    link = check_cli(superlink["args"])
    assert link.command == "superlink"
    service = by_kind[("Service", "superlink")]
    assert {p["port"] for p in service["spec"]["ports"]} == {link.fleet_port, link.control_port}
    probe = superlink["readinessProbe"]["exec"]["command"]
    assert probe[0] == READY and check_ready(probe[1:]).state == str(link.state)
    dns = f"superlink.{namespace['metadata']['name']}.svc"
    assert dns in hosts, f"the SuperLink's certificate ({hosts}) does not name {dns}"

    statefulset = by_kind[("StatefulSet", "site")]
    pods = [f"{statefulset['metadata']['name']}-{i}" for i in range(statefulset["spec"]["replicas"])]
    assert pods == certs.sites.split(",") == SITES, f"site pods {pods} vs the certificates' sites {certs.sites}"
    site = found["StatefulSet/site/site"]
    env = {e["name"]: e for e in site["env"]}
    assert env["SITE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "site name is not the pod name"
    args = check_cli(site["args"])
    assert option(site["args"], "--name") == "$(SITE_NAME)"
    assert args.superlink == f"{dns}:{link.fleet_port}", f"sites dial {args.superlink}"
    templates = [t["metadata"]["name"] for t in statefulset["spec"].get("volumeClaimTemplates", [])]
    source, _ = k8s_mounts(site)[str(args.data_dir)]
    assert source.startswith("template:") and source.split(":")[1] in templates, \
        f"the sites' {args.data_dir} is {source}, not a volumeClaimTemplate: one volume for all sites"

    server = found["Job/run/server"]
    assert check_cli(server["args"]).command == "run"
    check_run_environment({e["name"]: e["value"] for e in server["env"]}, f"{dns}:{link.control_port}",
                          str(link.certs))
    shared = k8s_mounts(server).get(SHARED)
    assert shared is not None and shared == k8s_mounts(superlink).get(SHARED), \
        f"the run Job and the SuperLink do not share one claim at {SHARED}"
    claim = by_kind[("PersistentVolumeClaim", shared[0])]
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "the shared claim is not ReadWriteMany"


# --- the tests
def test_dockerfile_runs_the_cli_as_a_user_with_the_model_inside():
    check_dockerfile(dockerfile_text())


def test_compose_starts_the_documented_commands_with_tls_and_a_volume_per_site():
    check_compose(compose())


def test_kubernetes_manifest_starts_the_documented_commands():
    text = (DEPLOY / "k8s" / "flcrew.yaml").read_text()
    check_k8s(k8s(), k8s_certs_command(text))


def test_no_file_turns_tls_off():
    for path in (DEPLOY / "Dockerfile", DEPLOY / "compose.yaml", DEPLOY / "k8s" / "flcrew.yaml"):
        text = path.read_text()
        assert "--insecure" not in text and "FLOWER_INSECURE" not in text.upper(), path


def test_the_run_command_is_the_cli_default(monkeypatch):
    """`run --rounds 3` (the server's command) and the bare default `--rounds 3` reach the same run."""
    import fl_crew_reddit.main as cli

    calls = []
    monkeypatch.setattr(cli, "run_command", lambda *args, **kwargs: calls.append((args, kwargs)) or 0)
    command = compose()["services"]["server"]["command"]
    assert cli.main(list(command)) == 0 and cli.main(command[1:]) == 0
    assert calls[0] == calls[1] and calls[0][0][0] == 3


def test_superlink_ready_fails_without_a_superlink(tmp_path):
    """The health check says why, and fails, when the CA is not there yet or nothing listens on the port."""
    import socket

    from fl_crew_reddit.federation.certs import make_certs

    script = tmp_path / READY
    script.write_text(ready_script(dockerfile_text()))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    make_certs(tmp_path / "certs", ["site-0"], ["superlink"])
    (tmp_path / "empty").mkdir()
    for certs, reason in ((tmp_path / "empty", "ca.crt"), (tmp_path / "certs", f"127.0.0.1:{port}")):
        done = subprocess.run([sys.executable, str(script), "127.0.0.1", "--ports", port, "--certs", str(certs)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stderr.startswith(f"{READY}: ") and reason in done.stderr, done.stderr


def _broken(mutate, document):
    document = copy.deepcopy(document)
    mutate(document)
    return document


def _services(document):
    return document["services"]


def _site_args(docs):
    (statefulset,) = [d for d in docs if d["kind"] == "StatefulSet"]
    return statefulset["spec"]["template"]["spec"]["containers"][0]["args"]


def _job(docs):
    (job,) = [d for d in docs if d["kind"] == "Job"]
    return job["spec"]["template"]["spec"]


# {case: (the message the check must fail with, how the copy is broken)}
COMPOSE_BREAKS = {
    "--insecure": ("TLS off", lambda d: _services(d)["site-0"]["command"].append("--insecure")),
    "FLOWER_INSECURE": ("TLS off", lambda d: _services(d)["server"]["environment"].update(FLOWER_INSECURE="true")),
    "unknown command": ("not a command", lambda d: _services(d)["site-1"].update(command=["serve-everything"])),
    "unknown flag": ("the CLI rejects", lambda d: _services(d)["site-1"]["command"].append("--tls")),
    "site missing from --sites": ("site services",
                                  lambda d: _services(d)["certs"]["command"].__setitem__(4, "site-0,site-1")),
    "shared data volume": ("share a data volume", lambda d: _services(d)["site-1"].update(
        volumes=["certs:/certs:ro", "site-0-data:/data"])),
    "run elsewhere": ("do not share one volume",
                      lambda d: _services(d)["server"].update(volumes=["certs:/certs:ro", "server:/srv/x"])),
    "writable certificates": ("certificates not read-only",
                              lambda d: _services(d)["site-2"]["volumes"].__setitem__(0, "certs:/certs")),
    "unknown setting": ("not settings",
                        lambda d: _services(d)["server"]["environment"].update(RESULTS_DIR="/srv/flcrew/results")),
    "no health check": ("health check",
                        lambda d: _services(d)["superlink"]["healthcheck"].update(test=["CMD", "true"])),
    "shared env_file": ("its own env_file", lambda d: _services(d)["site-2"].update(env_file=["sites/site-0.env"])),
    "wrong port": ("dials", lambda d: _services(d)["site-0"]["command"].__setitem__(6, "superlink:9093")),
}
K8S_BREAKS = {
    "--insecure": ("TLS off", lambda docs: _site_args(docs).append("--insecure")),
    "entrypoint replaced": ("not the CLI", lambda docs: _job(docs)["containers"][0].update(
        command=["python", "-m", "fl_crew_reddit.main"])),
    "two pods": ("site pods", lambda docs: [d["spec"].update(replicas=2) for d in docs if d["kind"] == "StatefulSet"]),
    "one claim for all sites": ("one volume for all sites", lambda docs: [
        d["spec"]["template"]["spec"]["volumes"].append({"name": "data", "persistentVolumeClaim": {"claimName": "x"}})
        for d in docs if d["kind"] == "StatefulSet"]),
    "run elsewhere": ("do not share one claim",
                      lambda docs: _job(docs)["volumes"][1]["persistentVolumeClaim"].update(claimName="y")),
    "writable certificates": ("certificates not read-only",
                              lambda docs: _job(docs)["containers"][0]["volumeMounts"][0].update(readOnly=False)),
}
DOCKERFILE_BREAKS = {
    "other entrypoint": ("not the CLI", lambda t: t.replace('"fl_crew_reddit.main"]', '"fl_crew_reddit.cli"]')),
    "root": ("runs as root", lambda t: t.replace("USER flcrew", "# no user")),
    "model in root's cache": ("prepare-model runs before USER", lambda t: t.replace("USER flcrew\n", "", 1).replace(
        "WORKDIR /srv/flcrew", "USER flcrew\nWORKDIR /srv/flcrew")),
    "hub online": ("HF_HUB_OFFLINE=1 missing", lambda t: t.replace("HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE=0")),
    "telemetry": ("FLWR_TELEMETRY_ENABLED=0 missing", lambda t: t.replace("FLWR_TELEMETRY_ENABLED=0 ", "")),
    "--insecure": ("TLS off", lambda t: t.replace('CMD ["--help"]', 'CMD ["site", "--insecure"]')),
    "no editable install": ("lacks the Flower app folder",
                            lambda t: t.replace("pip install --no-deps -e .", "pip install --no-deps .")),
}


@pytest.mark.parametrize("case", list(COMPOSE_BREAKS))
def test_the_compose_checks_can_fail(case):
    expected, mutate = COMPOSE_BREAKS[case]
    with pytest.raises(AssertionError, match=expected):
        check_compose(_broken(mutate, compose()))


@pytest.mark.parametrize("case", list(K8S_BREAKS))
def test_the_kubernetes_checks_can_fail(case):
    expected, mutate = K8S_BREAKS[case]
    certs_command = k8s_certs_command((DEPLOY / "k8s" / "flcrew.yaml").read_text())
    with pytest.raises(AssertionError, match=expected):
        check_k8s(_broken(mutate, k8s()), certs_command)


def test_the_kubernetes_sites_must_have_certificates():
    certs_command = k8s_certs_command((DEPLOY / "k8s" / "flcrew.yaml").read_text())
    other_sites = [*certs_command[:4], "a,b,c", *certs_command[5:]]
    with pytest.raises(AssertionError, match="site pods"):
        check_k8s(k8s(), other_sites)
    no_dns = [*certs_command[:6], "superlink"]
    with pytest.raises(AssertionError, match="does not name"):
        check_k8s(k8s(), no_dns)


@pytest.mark.parametrize("case", list(DOCKERFILE_BREAKS))
def test_the_dockerfile_checks_can_fail(case):
    expected, mutate = DOCKERFILE_BREAKS[case]
    if case == "no editable install" and "flower_app" in (ROOT / "pyproject.toml").read_text():
        pytest.skip("the package data lists the Flower app: a plain install has it too")
    text = dockerfile_text()
    broken = mutate(text)
    assert broken != text, "the mutation no longer applies to deploy/Dockerfile"
    with pytest.raises(AssertionError, match=expected):
        check_dockerfile(broken)
