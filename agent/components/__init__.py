"""Components: the engine instances (vLLM servers, tools, simulated engines) an agent runs."""
