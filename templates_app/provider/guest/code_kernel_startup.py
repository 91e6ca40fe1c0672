"""Runs in every Python kernel of the code interpreter, as an IPython startup file.

``code_server.py`` copies it into the kernels' IPython profile. It makes tracebacks plain text,
sends output 50 ms after it is printed, and renders matplotlib figures with their chart data
(``application/vnd.watasu.chart+json``, the SDK's ``Result.chart``) next to the PNG. The figure
formatter is registered by name: nothing is imported until the user's code imports matplotlib.
Runs inside the kernel on Debian 12's python3 (IPython 8.5, matplotlib 3.6).
"""


def _watasu_setup():
    import contextlib
    import itertools
    import math

    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    ip = get_ipython()
    if ip is None:
        return
    with contextlib.suppress(Exception):
        ip.run_line_magic("colors", "NoColor")
    import sys

    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "flush_interval"):
            # Output is sent 50 ms after it is printed rather than 200 ms: its timestamp is when
            # the kernel sends it, and callers see lines as they happen.
            stream.flush_interval = 0.05

    def num(value):
        try:
            f = float(value)
        except (TypeError, ValueError):
            return str(value)
        return f if math.isfinite(f) else None

    def ticks(axis, values):
        try:
            return [str(t) for t in axis.get_major_formatter().format_ticks(list(values))]
        except Exception:
            return []

    def scale(ax, which):
        axis = ax.xaxis if which == "x" else ax.yaxis
        try:
            import matplotlib.dates as mdates

            if isinstance(
                axis.get_major_formatter(),
                (mdates.DateFormatter, mdates.AutoDateFormatter, mdates.ConciseDateFormatter),
            ):
                return "datetime"
        except Exception:
            pass
        if axis.get_major_formatter().__class__.__name__ == "StrCategoryFormatter":
            return "categorical"
        return ax.get_xscale() if which == "x" else ax.get_yscale()

    def label(artist):
        text = artist.get_label() or ""
        return "" if text.startswith("_") else text

    def axes2d(ax, kind, elements):
        xt, yt = list(ax.get_xticks()), list(ax.get_yticks())
        return {
            "type": kind,
            "title": ax.get_title(),
            "x_label": ax.get_xlabel() or None,
            "y_label": ax.get_ylabel() or None,
            "x_unit": None,
            "y_unit": None,
            "x_ticks": [num(t) for t in xt],
            "x_tick_labels": ticks(ax.xaxis, xt),
            "x_scale": scale(ax, "x"),
            "y_ticks": [num(t) for t in yt],
            "y_tick_labels": ticks(ax.yaxis, yt),
            "y_scale": scale(ax, "y"),
            "elements": elements,
        }

    def points(xs, ys):
        return [[num(x), num(y)] for x, y in itertools.islice(zip(xs, ys, strict=False), 10000)]

    def bars(ax):
        from matplotlib.container import BarContainer

        tick_at = {}
        for tick in ax.get_xticklabels():
            tick_at[round(float(tick.get_position()[0]), 6)] = tick.get_text()
        positions = list(ax.get_xticks())
        names = ticks(ax.xaxis, positions)
        for pos, name in zip(positions, names, strict=False):
            tick_at.setdefault(round(float(pos), 6), name)
        out = []
        for container in ax.containers:
            if not isinstance(container, BarContainer):
                continue
            group = label(container)
            for rect in container.patches:
                center = round(rect.get_x() + rect.get_width() / 2, 6)
                out.append(
                    {
                        "label": tick_at.get(center) or str(center),
                        "group": group,
                        "value": str(num(rect.get_height())),
                    }
                )
        return out

    def chart_of_axes(ax):
        from matplotlib.collections import PathCollection
        from matplotlib.container import BarContainer
        from matplotlib.patches import Wedge

        wedges = [p for p in ax.patches if isinstance(p, Wedge)]
        if wedges:
            return {
                "type": "pie",
                "title": ax.get_title(),
                "elements": [
                    {"label": label(w), "angle": abs(w.theta2 - w.theta1), "radius": num(w.r)} for w in wedges
                ],
            }
        if any(isinstance(c, BarContainer) for c in ax.containers):
            return axes2d(ax, "bar", bars(ax))
        scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 0]
        if scatters and not lines:
            elements = []
            for c in scatters:
                offsets = c.get_offsets()
                elements.append({"label": label(c), "points": points(offsets[:, 0], offsets[:, 1])})
            return axes2d(ax, "scatter", elements)
        if lines:
            elements = [
                {"label": label(line), "points": points(line.get_xdata(), line.get_ydata())} for line in lines
            ]
            return axes2d(ax, "line", elements)
        return {"type": "unknown", "title": ax.get_title(), "elements": []}

    def chart_of_figure(fig):
        try:
            charts = [chart_of_axes(ax) for ax in fig.axes]
        except Exception:
            return None
        if not charts:
            return None
        if len(charts) == 1:
            return charts[0]
        suptitle = getattr(fig, "_suptitle", None)
        return {"type": "superchart", "title": suptitle.get_text() if suptitle else "", "elements": charts}

    class ChartFormatter(BaseFormatter):
        format_type = Unicode("application/vnd.watasu.chart+json")
        print_method = ObjectName("_repr_watasu_chart_")
        _return_type = dict

        def pop(self, typ, default=None):
            # The inline backend, when it starts, pops Figure from every formatter (for its own
            # image formats): this one keeps its printer.
            return default

    def close_shown_result(*args):
        # A figure that is the cell's result was just sent as such: close it so the inline
        # backend's end-of-cell flush does not send it a second time.
        result = getattr(getattr(ip, "last_execution_result", None), "result", None)
        if result is not None and type(result).__name__ == "Figure":
            import matplotlib.pyplot as plt

            plt.close(result)

    formatter = ChartFormatter(parent=ip.display_formatter)
    ip.display_formatter.formatters[formatter.format_type] = formatter
    active = getattr(ip.display_formatter, "active_types", None)
    if isinstance(active, list) and formatter.format_type not in active:
        active.append(formatter.format_type)
    formatter.for_type_by_name("matplotlib.figure", "Figure", chart_of_figure)
    ip.events.register("post_execute", close_shown_result)


_watasu_setup()
del _watasu_setup
