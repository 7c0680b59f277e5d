# The learning chatbot on a CUDA GPU host: `docker compose up` (compose.yaml),
# or `docker build -t learning-chatbot .` then `docker run --gpus all ...`
# (docs/deploy.md). The data directory (database, adapters, browser secret,
# model cache) is the volume at /data; the server runs as a user without
# root; /healthz answers 503 while the model loads, then 200.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CHATBOT_DATA_DIR=/data \
    HF_HOME=/data/hf-cache
# torch's CUDA build first, so that the project's install keeps it
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cu124

WORKDIR /app
COPY pyproject.toml README.md app.py ./
COPY chatbot ./chatbot
COPY online_rl ./online_rl
COPY storage ./storage
RUN pip install --no-cache-dir '.[quantize]'

RUN useradd --system --create-home --uid 10001 chatbot \
    && mkdir -p /data && chown chatbot:chatbot /data
USER chatbot
VOLUME /data
EXPOSE 7860

HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/healthz', timeout=4)"

ENTRYPOINT ["python3", "app.py"]
CMD ["serve", "--host", "0.0.0.0", "--port", "7860", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--log-json"]
