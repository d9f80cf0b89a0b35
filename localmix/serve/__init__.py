"""`localmix serve`: the OpenAI and Ollama HTTP APIs over the engine.

app (routes shared by both APIs: errors, bodies, streaming), openai and ollama (their routes and
request models), prompts (messages → exact prompt tokens), models (the loaded-model registry:
load on demand, keep-alive, eviction), scheduler (one thread per model running the batch loop),
server (uvicorn on a bound socket), client (what `localmix ps` asks a running server).
"""
