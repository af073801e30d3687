# One image for every compose service (the teacher service, the trainers, the report) and for `akd bench`.
# Layers run from the least to the most often changed, so a source change rebuilds only the last (seconds):
#   1. torch, from the TORCH build argument: what pip installs for torch (a spec, a wheel URL, or a spec and
#      its index). PyPI's Linux x86_64 torch is a CUDA build (about 2.9 GB of downloads, a 5.6 GB image): the
#      right one for GPU hosts, and it falls back to the CPU. For a CPU-only image (1.6 GB):
#      --build-arg TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#   2. the project's dependencies and its bench extra, read from pyproject.toml, at requirements.lock's versions
#      (a constraints file, from `make lock`) and beside the torch of layer 1, in one resolution: torch pinned to the
#      version its installed distribution declares (PyPI's says 2.13.0 where torch.__version__ says 2.13.0+cu130, a
#      version no index holds), so that pip keeps it rather than looking for another
#   3. the project, without dependencies
# Its processes run as the user `akd` (uid 1000), never as root. docker-compose.yml runs them as the host user instead
# (its `user:`), so that what they write on the host is that user's: the image works under any uid, its HOME (where
# matplotlib and torch keep their caches) writable by all, as /tmp is. What the service and the demo write goes to
# the folders they are given (compose: the bind mount /data/demo); /data is akd's, for a volume mounted there.
# HEALTHCHECK: the teacher service's readiness (GET /readyz), on the port it listens on, with the standard library.
FROM python:3.11-slim
ARG TORCH=torch==2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1 \
    HOME=/home/akd
RUN useradd --uid 1000 --user-group --home-dir /home/akd --shell /usr/sbin/nologin akd \
 && mkdir -p /home/akd /data && chmod 1777 /home/akd && chown akd:akd /data
RUN pip install $TORCH
WORKDIR /app
COPY requirements.lock pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['bench'], sep='\n')" > /tmp/deps.txt \
 && pip install -c requirements.lock -r /tmp/deps.txt \
    "torch==$(python -c 'from importlib.metadata import version; print(version("torch"))')"
COPY . .
RUN pip install --no-deps . && akd --help >/dev/null
ENV AKD_HOST=0.0.0.0 AKD_PORT=8000
EXPOSE 8000
USER akd
# The teachers load and the cache verifies before the service listens: generous start-up, then 3 misses in a row.
HEALTHCHECK --interval=10s --timeout=10s --start-period=10m --retries=3 CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/readyz' % os.environ.get('AKD_PORT', '8000'), timeout=8)"]
CMD ["akd", "serve"]
