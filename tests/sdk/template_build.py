"""Template builds through the public SDK: build with logs and an uploaded build context,
start a sandbox from the alias (installed package, files, env, started server), rebuild
from the cache, change one step (earlier layers cached), change only an env (the image
layer cached), pin by tag, a Dockerfile (WORKDIR created, `python`, `pip install`, the
ready check's progress), a failing step's output, an unsupported image and version."""

import tempfile
import time
from pathlib import Path

from watasu import Sandbox, Template, wait_for_port
from watasu.exceptions import BuildException, InvalidArgumentException

context = Path(tempfile.mkdtemp())
(context / "app" / "static").mkdir(parents=True)
(context / "app" / "index.txt").write_text("from-the-build-context\n")
(context / "app" / "static" / "big.bin").write_bytes(bytes(range(256)) * 1024)  # 256 KiB


def py_template(marker: str) -> Template:
    return (
        Template(file_context_path=str(context))
        .from_python_image()
        .pip_install(["six"])
        .copy("app", "/srv/app/")
        .run_cmd(f"echo {marker} > /srv/app/marker")
        .set_envs({"GREETING": "hello"})
        .set_start_cmd("cd /srv/app && python3 -m http.server 8000", wait_for_port(8000))
    )


def build(template: Template, name: str) -> tuple[object, list[str], float]:
    logs: list[object] = []
    started = time.monotonic()
    info = Template.build(template, name, cpu_count=1, memory_mb=512, on_build_logs=logs.append)
    return info, [str(getattr(entry, "message", "")) for entry in logs], time.monotonic() - started


def run(template_ref: str, command: str) -> str:
    sandbox = Sandbox.create(template_ref, timeout=120)
    try:
        return sandbox.commands.run(command).stdout
    finally:
        sandbox.kill()


first, messages, first_seconds = build(py_template("built-by-watasu"), "py-ci:stable")
assert any(m.startswith("packages.pip") for m in messages), messages
assert any(m.startswith("Setting up python3-pip") for m in messages), messages  # output, line by line
assert Template.alias_exists("py-ci")
assert [t.tag for t in Template.get_tags("py-ci")] == ["stable"]

probe = (
    "python3 -c 'import six; print(six.__name__)' && cat /srv/app/marker && echo $GREETING && "
    "cat /srv/app/index.txt && md5sum < /srv/app/static/big.bin | cut -c1-8 && "
    'python3 -c "import urllib.request; print(urllib.request.urlopen('
    "'http://127.0.0.1:8000/marker').read().decode().strip())\""
)
assert run("py-ci:stable", probe).split() == [
    "six",
    "built-by-watasu",
    "hello",
    "from-the-build-context",
    "d19215b1",
    "built-by-watasu",
]

# The same template again: every layer and the artifact come from the cache.
second, messages, second_seconds = build(py_template("built-by-watasu"), "py-ci")
assert any("cache hit" in m for m in messages), messages
assert not any(m.startswith("Setting up python3-pip") for m in messages), messages  # nothing ran again

# One changed step: the layers before it are reused, it and what follows run again.
third, messages, _ = build(py_template("second-edition"), "py-ci")
assert "from_image: cached" in messages and "packages.pip: cached" in messages, messages
assert "files: cached" in messages and not any(m == "setup[0]: cached" for m in messages), messages
assert run("py-ci", "cat /srv/app/marker").strip() == "second-edition"
# Tags pin: `stable` still names the first build; a new tag can be assigned to it.
assert run("py-ci:stable", "cat /srv/app/marker").strip() == "built-by-watasu"
Template.assign_tags(f"py-ci:{first.build_id}", ["prod"])
assert run("py-ci:prod", "cat /srv/app/marker").strip() == "built-by-watasu"
assert {t.tag: t.build_id for t in Template.get_tags("py-ci")} == {
    "prod": first.build_id,
    "stable": first.build_id,
}

# Only an env changed: the image layer is reused, the steps that run with the env run again.
_, messages, _ = build(py_template("second-edition").set_envs({"GREETING": "bonjour"}), "py-env")
assert "from_image: cached" in messages and "packages.pip: cached" not in messages, messages
assert run("py-env", "echo $GREETING; python --version").split() == ["bonjour", "Python", "3.11.2"]

# skip_cache: every step runs again.
_, messages, _ = build(py_template("second-edition").skip_cache(), "py-ci")
assert "skip_cache: every step runs" in messages and "packages.pip: cached" not in messages, messages

dockerfile = """
FROM python:3.11-slim
WORKDIR /srv/web
ENV GREETING=from-docker
COPY app/index.txt /srv/web/index.txt
RUN echo $GREETING > greeting.txt
WORKDIR /opt/tool
RUN pip install -q six && python -c "import six; print(six.__name__)" > made-here.txt
CMD ["python3", "-m", "http.server", "8001", "--directory", "/srv/web"]
"""
_, messages, _ = build(Template(file_context_path=str(context)).from_dockerfile(dockerfile), "docker-web")
# The CMD's ready check is `sleep 20`: it reports while it waits.
assert any(m.startswith("ready check: not ready after 10 s (limit ") for m in messages), messages
fetch = (
    'cat /srv/web/greeting.txt /opt/tool/made-here.txt && python3 -c "import urllib.request; '
    "print(urllib.request.urlopen('http://127.0.0.1:8001/index.txt').read().decode().strip())\""
)
assert run("docker-web", fetch).split() == ["from-docker", "six", "from-the-build-context"]

try:
    Template.build(Template().from_base_image().run_cmd("echo boom-output; exit 3"), "broken")
    raise AssertionError("a failing step must fail the build")
except BuildException as exc:
    assert "setup[0]" in str(exc) and "boom-output" in str(exc), str(exc)

try:
    Template.build(Template().from_image("ubuntu:24.04"), "ubuntu-try")
    raise AssertionError("an unsupported image must be refused")
except InvalidArgumentException as exc:
    assert "supported images" in str(exc), str(exc)

try:
    Template.build(Template().from_python_image("3.12"), "py312")
    raise AssertionError("a Python that Debian 12 does not have must be refused")
except InvalidArgumentException as exc:
    assert "'python:3.12'" in str(exc) and "python:3.11" in str(exc), str(exc)
print(f"ok first={first_seconds:.1f}s cached={second_seconds:.1f}s")
