"""The pre-registered reproductions behind ``jobs/reproduce.py --design v1|v2|v3``, apart from the library.

``stages``: what every design is built from (scale overlay, calibration of the steps, the level-weight
sweep, training once, training every variant, writing and re-rendering the results); ``v1``, ``v2``,
``v3``: one design each (its ``VARIANTS`` and ``reproduce(args, probes)``); ``compare`` (seed
statistics, tables and plots; v1, and the tables v2 shares), ``paired`` (v2: paired contrasts over test
images, its report), ``report_v3`` (the v3 report). The presets stay in ``hierdino/presets/repro/``.
"""
