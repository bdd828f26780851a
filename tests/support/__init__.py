"""What the tests and benchmarks build their inputs from: layouts, random-weight model files, the diffusers reference.

It lives beside the tests, never in the wheel: users of sfumato do not need it.
"""
