"""Print the build specs the real SDK sends for builders using every method it has
(no server involved), one JSON object per line, so the server can check it accepts them."""

import json
import tempfile
from pathlib import Path

from watasu import Template, wait_for_port

context = Path(tempfile.mkdtemp())
(context / "app").mkdir()
(context / "app" / "main.py").write_text("print('hi')\n")

builders = [
    (
        Template(file_context_path=str(context))
        .from_python_image("3.11")
        .apt_install(["git"])
        .pip_install(["six"])
        .npm_install(["typescript"], g=True)
        .copy("app", "/srv/app/", mode=0o755, user="root:root")
        .copy_items([{"src": "app/main.py", "dest": "/srv/main.py"}])
        .set_workdir("/srv/app")
        .set_user("nobody")
        .run_cmd(["echo one", "echo two"])
        .make_dir("/srv/data")
        .remove("/tmp/x", force=True)
        .rename("/a", "/b")
        .make_symlink("/a", "/c")
        .git_clone("https://example.invalid/r.git", "/srv/r", branch="main", depth=1)
        .set_envs({"A": "1"})
        .set_start_cmd("python3 -m http.server 8000", wait_for_port(8000))
    ),
    Template().from_base_image().set_ready_cmd("true"),
    Template().from_template("base").pip_install(["six"], g=False).npm_install(["left-pad"]),
    Template().from_node_image().run_cmd("node --version"),
    Template().from_debian_image("bookworm"),
    Template(file_context_path=str(context)).from_dockerfile(
        "FROM python:3.11-slim\nWORKDIR /srv/web\nUSER root\nENV A=1 B=2\nCOPY app/main.py /srv/web/\n"
        'ADD app /srv/more\nRUN pip install six\nCMD ["python", "main.py"]\n'
    ),
]
for builder in builders:
    print(json.dumps(builder.to_build_spec()))
