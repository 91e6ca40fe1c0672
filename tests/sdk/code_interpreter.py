"""The code interpreter through the real `watasu-code-interpreter` SDK, sync and async, on one sandbox.

`Sandbox.create()` starts the default `code-interpreter` template; every check after that runs
in the same sandbox (CI time is VM time). The last line printed is JSON with the timings.
A streamed run (`Accept: application/x-ndjson`) is read through the edge with httpx: its first
line must arrive while the run still waits for a file the scenario writes only after it.
"""

import asyncio
import base64
import json
import time

import httpx
from waiting import wait_until
from watasu_code_interpreter import AsyncSandbox, Sandbox
from watasu_code_interpreter.charts import ChartType

from watasu.exceptions import NotFoundException, TimeoutException

timings = {}
started = time.monotonic()
sbx = Sandbox.create(envs={"FROM_CREATE": "yes"})
timings["create_s"] = round(time.monotonic() - started, 2)
try:
    assert sbx.get_info().template_id == "code-interpreter", sbx.get_info()

    # stdout, as lines with the kernel's timestamps
    first = time.monotonic()
    execution = sbx.run_code("print('code-ok')")
    timings["first_run_code_s"] = round(time.monotonic() - first, 2)
    assert [m.line for m in execution.logs.stdout] == ["code-ok\n"], execution
    assert execution.error is None and execution.execution_count == 1, execution

    # state persists between runs; the last expression is the main result
    sbx.run_code("x = 41")
    assert sbx.run_code("x + 1").text == "42"
    round_trips = []
    for _ in range(5):
        one = time.monotonic()
        sbx.run_code("x")
        round_trips.append(time.monotonic() - one)
    timings["run_code_p50_ms"] = round(sorted(round_trips)[2] * 1000)

    # env vars: the sandbox's own from create, and per run (gone afterwards)
    assert sbx.run_code("import os; os.environ['FROM_CREATE']").text == "'yes'"
    assert sbx.run_code("os.environ['PER_RUN']", envs={"PER_RUN": "1"}).text == "'1'"
    assert sbx.run_code("os.environ.get('PER_RUN', 'gone')").text == "'gone'"

    # a matplotlib figure: a PNG and its chart data
    plot = sbx.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9], label='squares')\n"
        "plt.title('growth'); plt.xlabel('n'); plt.ylabel('n squared')\n"
        "plt.show()"
    )
    assert plot.error is None, plot.error
    [figure] = plot.results
    assert base64.b64decode(figure.png).startswith(b"\x89PNG"), figure.formats()
    chart = figure.chart
    assert chart is not None and chart.type == ChartType.LINE, figure.formats()
    assert (chart.title, chart.x_label, chart.y_label) == ("growth", "n", "n squared")
    squares = [(1.0, 1.0), (2.0, 4.0), (3.0, 9.0)]
    assert [(e.label, e.points) for e in chart.elements] == [("squares", squares)]
    bars = sbx.run_code("fig, ax = plt.subplots()\nax.bar(['a', 'b'], [3, 5])\nfig")
    [bar] = bars.results
    assert bar.is_main_result and bar.png and bar.chart.type == ChartType.BAR, bars
    assert [(e.label, e.value) for e in bar.chart.elements] == [("a", "3.0"), ("b", "5.0")]

    # a DataFrame as HTML and text
    frame = sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    assert "<table" in frame.results[0].html and "a  b" in frame.results[0].text, frame

    # an exception: name, value, a plain-text traceback
    failed = sbx.run_code("1 / 0")
    assert (failed.error.name, failed.error.value) == ("ZeroDivisionError", "division by zero"), failed
    assert "ZeroDivisionError" in failed.error.traceback and "\x1b[" not in failed.error.traceback

    # callbacks see lines with the times they were printed
    seen = []
    sbx.run_code("import time\nprint('a')\ntime.sleep(1)\nprint('b')", on_stdout=seen.append)
    assert [m.line for m in seen] == ["a\n", "b\n"], seen
    # (a second apart, less the kernel's output flush delay under a slow VM)
    assert seen[1].timestamp - seen[0].timestamp >= 0.7, [m.timestamp for m in seen]

    # a timeout interrupts the kernel; the context keeps its state
    try:
        sbx.run_code("import time; time.sleep(60)", timeout=2)
        raise AssertionError("the run must time out")
    except TimeoutException as exc:
        assert "Execution timed out" in str(exc), exc
    assert sbx.run_code("x").text == "41"

    # contexts: cwd, list, restart (state cleared), remove
    ctx = sbx.create_code_context(cwd="/tmp", language="python")
    assert (ctx.language, ctx.cwd) == ("python", "/tmp"), ctx
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "'/tmp'"
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]
    sbx.run_code("y = 1", context=ctx)
    sbx.restart_code_context(ctx)
    assert sbx.run_code("y", context=ctx).error.name == "NameError"
    sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
    try:
        sbx.run_code("1", context=ctx)
        raise AssertionError("a removed context must be unknown")
    except NotFoundException:
        pass

    # bash, a persistent shell per context
    sbx.run_code("cd /tmp && export GREETING=hi", language="bash")
    shell = sbx.run_code('echo "$GREETING from $(pwd)"', language="bash")
    assert [m.line for m in shell.logs.stdout] == ["hi from /tmp\n"], shell

    # the streamed mode through the edge: the first line arrives before the run ends
    plane = sbx._require_data_plane()
    gate = "/tmp/stream-gate"
    code = (
        "import os, time\nprint('first', flush=True)\n"
        f"while not os.path.exists({gate!r}): time.sleep(0.05)\nprint('second')"
    )
    headers = {**plane.headers, "Accept": "application/x-ndjson"}
    headers.pop("Connection", None)
    with httpx.stream(
        "POST", plane.url("/runtime/v1/code/run"), json={"code": code}, headers=headers, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "application/x-ndjson", response.headers
        lines = response.iter_lines()
        event = json.loads(next(lines))
        assert (event["type"], event["line"]) == ("stdout", "first\n"), event
        sbx.files.write(gate, "")
        events = [json.loads(line) for line in lines if line]
    assert [e["type"] for e in events] == ["stdout", "end"], events
    assert [m["line"] for m in events[-1]["execution"]["logs"]["stdout"]] == ["first\n", "second\n"]

    # the async SDK on the same sandbox
    async def async_checks() -> None:
        asbx = await AsyncSandbox.connect(sbx.sandbox_id)
        assert (await asbx.run_code("x * 2")).text == "82"
        lines = []
        await asbx.run_code("print('async-ok')", on_stdout=lines.append)
        assert [m.line for m in lines] == ["async-ok\n"], lines
        actx = await asbx.create_code_context(cwd="/root")
        assert (await asbx.run_code("import os; os.getcwd()", context=actx)).text == "'/root'"
        assert actx.id in [c.id for c in await asbx.list_code_contexts()]
        await asbx.run_code("z = 3", context=actx)
        await asbx.restart_code_context(actx)
        assert (await asbx.run_code("z", context=actx)).error.name == "NameError"
        await asbx.remove_code_context(actx)

    asyncio.run(async_checks())

    # two sandboxes from the same warm snapshot draw different random numbers
    draw = "import random, numpy as np; (random.random(), float(np.random.rand()))"
    other = Sandbox.create()
    try:
        mine, theirs = sbx.run_code(draw).text, other.run_code(draw).text
        assert mine and theirs and mine != theirs, (mine, theirs)
    finally:
        other.kill()

    # a code server killed by code comes back (with a new warm default context)
    sbx.commands.run("pkill -9 -f '^python3 /opt/watasu/code/code_serve[r].py'", user="root")
    wait_until(
        lambda: sbx.run_code("print('back')", request_timeout=30).logs.stdout,
        120,
        "the code server to start again",
        ignoring=(Exception,),
    )
finally:
    sbx.kill()
print(json.dumps(timings))
