"""Adaptive and predictive allocation (issue 9, parts 1-3): the usage model
(:mod:`.usage`), per-slice policies (:mod:`.policy`), the reactive controller
(:mod:`.controller`), the seasonal forecaster (:mod:`.forecast`), synthetic traces
(:mod:`.traces`) and ``slicefab bench adaptive`` (:mod:`.bench`). docs/adaptive.md."""
