"""Everything chatglm.cpp: the backend a worker uses (backend.py: it forwards each request to the
engine), the engine process and its client (engine/), the model file's check (ggml_file.py), the
demo model's writer (demo_model.py), the tool-call formats of ChatGLM3 and GLM-4 (chatglm3_tools.py,
glm4_tools.py) and GLM-4V's image decoding (images.py; image_pool.py runs it in helper processes of the
worker, bounded in time and memory).

May import backends/ (base.py, stops.py), nothing above it; no other backend imports this."""
