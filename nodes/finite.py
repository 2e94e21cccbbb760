"""The pack's one check of float widgets: a number that is not finite is refused at the node that got it.

ComfyUI's min/max check lets NaN through (every comparison with NaN is false) and an API prompt may send JSON NaN;
a float can also arrive through a link from another node, which no validation sees. Decorate a node's ``execute``
with ``finite_floats`` (under ``@classmethod``).
"""
import functools
import inspect
import math

from comfy_api.latest import io


def finite_floats(execute):
    params = list(inspect.signature(execute).parameters)[1:]  # after cls

    @functools.wraps(execute)
    def checked(cls, *args, **kwargs):
        values = dict(zip(params, args), **kwargs)
        schema = cls.define_schema()
        for spec in schema.inputs:
            value = values.get(spec.id)
            if isinstance(spec, io.Float.Input) and isinstance(value, float) and not math.isfinite(value):
                span = f" between {spec.min} and {spec.max}" if spec.min is not None and spec.max is not None else ""
                raise ValueError(f"{schema.display_name or schema.node_id}: '{spec.id}' is {value}, not a finite "
                                 f"number; set a number{span}")
        return execute(cls, *args, **kwargs)

    return checked
