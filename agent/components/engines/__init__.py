"""Engines behind components: ``vllm`` servers, ``tool`` entry points and ``sim`` models."""
