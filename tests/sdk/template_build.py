"""Template builds through the public SDK: build with logs, start a sandbox from the alias
(installed package, file, env, started server), pin by tag, a failing step's output."""

from watasu import Sandbox, Template, wait_for_port
from watasu.exceptions import BuildException, InvalidArgumentException

logs = []
template = (Template().from_python_image()
            .pip_install(["six"])
            .run_cmd("mkdir -p /srv/app && echo built-by-watasu > /srv/app/marker")
            .set_envs({"GREETING": "hello"})
            .set_start_cmd("cd /srv/app && python3 -m http.server 8000", wait_for_port(8000)))
info = Template.build(template, "py-ci:stable", cpu_count=1, memory_mb=512, on_build_logs=logs.append)
messages = [str(getattr(entry, "message", "")) for entry in logs]
assert any(m.startswith("packages.pip") for m in messages), messages
assert Template.alias_exists("py-ci")
assert [t.tag for t in Template.get_tags("py-ci")] == ["stable"]

sandbox = Sandbox.create("py-ci:stable", timeout=120)
probe = ("python3 -c 'import six; print(six.__name__)' && cat /srv/app/marker && echo $GREETING && "
         "python3 -c \"import urllib.request; print(urllib.request.urlopen("
         "'http://127.0.0.1:8000/marker').read().decode().strip())\"")
result = sandbox.commands.run(probe)
assert result.stdout.split() == ["six", "built-by-watasu", "hello", "built-by-watasu"], result.stdout
assert sandbox.get_info().template_id == "py-ci"
sandbox.kill()

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
print("ok")
