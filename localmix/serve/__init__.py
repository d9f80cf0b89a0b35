"""`localmix serve`: the OpenAI and Ollama HTTP APIs over the engine.

app (routes shared by both APIs: errors, bodies, streaming), guard (who may call: host names,
origins, API keys), openai and ollama (their routes and request models), prompts (messages →
exact prompt tokens), models (the loaded-model registry: load on demand, keep-alive, eviction),
worker (each loaded model's own process), scheduler (the batch loop a worker runs), server
(uvicorn on a bound socket), client (what `localmix ps` asks a running server).
"""
