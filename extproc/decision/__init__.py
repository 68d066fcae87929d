"""From the engines' results to a `Verdict`: pure, no I/O, no protobuf. Layer: decision.

* `decide.py`: the stages (CUSTOM, JWT, policies) and the Verdict each produces
* `cache.py`: verdicts remembered by the values of only what the snapshot's policies read
"""
