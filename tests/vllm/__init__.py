"""FlexServe in front of a real vLLM server (``make test-vllm``).

A package, so that its ``conftest`` does not take the place of the suite's
top-level one (both would otherwise be imported as the module ``conftest``).
"""
