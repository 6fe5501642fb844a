"""Set-up run inside every Python kernel when its context starts (sent as source, not imported).

It makes IPython behave as E2B's code interpreter does: tracebacks without ANSI colours, full
sequence reprs, matplotlib figures also sent as ``e2b/chart`` (E2B's chart schema, built by the
``e2b-charts`` package), pandas DataFrames also sent as ``e2b/data``, and lists and dicts also
sent as ``application/json``, and PIL images shown (``.show()``) or saved to a path come back as
``image/png`` results instead of starting a desktop viewer (``xdg-open``) that no sandbox has.
"""

import json
import sys
import warnings

from IPython import get_ipython  # noqa: F401 - used by the line the server appends
from IPython.core.formatters import BaseFormatter, JSONFormatter
from traitlets import Unicode

# DataFrames bigger than this are sent without the e2b/data copy: it would repeat the whole table.
MAX_DATA_CELLS = 100_000


class ChartFormatter(BaseFormatter):
    format_type = Unicode("e2b/chart")

    def __call__(self, obj):
        figure_module = sys.modules.get("matplotlib.figure")
        if figure_module is None or not isinstance(obj, figure_module.Figure):
            return None
        try:
            from e2b_charts import chart_figure_to_dict

            # pydantic warns about numpy tick types; the warning would land in the cell's stderr.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return chart_figure_to_dict(obj) or None
        except Exception:  # noqa: BLE001 - a figure e2b-charts cannot read still gets its PNG
            return None


class DataFrameFormatter(BaseFormatter):
    format_type = Unicode("e2b/data")

    def __call__(self, obj):
        pandas = sys.modules.get("pandas")
        if pandas is None or not isinstance(obj, pandas.DataFrame) or obj.size > MAX_DATA_CELLS:
            return None
        try:
            columns = obj.to_dict(orient="list")
            return {
                str(name): [v.isoformat() if isinstance(v, pandas.Timestamp) else v for v in values]
                for name, values in columns.items()
            }
        except Exception:  # noqa: BLE001 - a formatter must never break display
            return None


# ipykernel batches prints for 0.2 s: a print loop then makes 40 MB messages. Flushing more often
# keeps each message (and the server's memory per message) small, and output shows up sooner.
STREAM_FLUSH_SECONDS = 0.05


def _array_to_list(value):
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class ContainerJSONFormatter(JSONFormatter):
    def __call__(self, obj):
        if isinstance(obj, (list, dict)):
            try:
                return json.loads(json.dumps(obj, default=_array_to_list)), {"expanded": True}
            except (TypeError, ValueError):
                pass
        return super().__call__(obj)


def _patch_pil() -> None:
    """As E2B's template means to: desktop viewers do nothing, so ``Image.show()`` falls through to
    PIL's IPython viewer (a display_data); ``Image.save(path)`` also displays the image."""
    try:
        from IPython.display import display
        from PIL import Image, ImageShow
    except ImportError:
        return

    def decline(self, image, **options):
        return 0

    # Every Unix viewer (xdg-open, display, eog, ...) declines before writing a temp file (its
    # save would display the image a second time), so PIL's IPython viewer shows it, once.
    ImageShow.UnixViewer.show = decline  # type: ignore[method-assign]
    original_save = Image.Image.save

    def save(self, fp, format=None, **params):
        if isinstance(fp, str):
            display(self)
        return original_save(self, fp, format, **params)

    Image.Image.save = save  # type: ignore[method-assign]


def install(shell) -> None:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "flush_interval"):
            stream.flush_interval = STREAM_FLUSH_SECONDS
    shell.colors = "nocolor"
    display = shell.display_formatter
    display.formatters["text/plain"].max_seq_length = 0
    display.formatters["e2b/chart"] = ChartFormatter(parent=display)
    display.formatters["e2b/data"] = DataFrameFormatter(parent=display)
    display.formatters["application/json"] = ContainerJSONFormatter(parent=display)
    _patch_pil()
