# q3serve serving image: the image that helm/q3serve (values.yaml: image.repository
# q3serve/q3serve, tag 0.1.0, rayVersion 2.60.0) runs in every Ray pod.
# Build: helm/q3serve/build-image.sh (or `docker build -t q3serve/q3serve:0.1.0 .`).

# Ray's own image of the Ray version the chart pins (rayVersion): Ray, Python 3.11 (conda, in
# /home/ray/anaconda3) and the CUDA user-space libraries, run as user `ray` (uid 1000, gid 100),
# which is what KubeRay expects. `-gpu` is Ray's alias for its default CUDA build of that release;
# to pin one CUDA version, build with e.g. --build-arg RAY_IMAGE_TAG=2.60.0-py311-cu128. Builders
# that do not expand short names (podman/buildah without unqualified-search registries) take the
# fully qualified name: --build-arg BASE_IMAGE=<registry>/rayproject/ray:<tag>.
ARG RAY_VERSION=2.60.0
ARG RAY_IMAGE_TAG=${RAY_VERSION}-py311-gpu
ARG BASE_IMAGE=rayproject/ray:${RAY_IMAGE_TAG}
FROM ${BASE_IMAGE}

# Re-declared after FROM so the steps below can use it.
ARG RAY_VERSION=2.60.0
# torch matching pyproject.toml's upper bound. On Linux x86_64 PyPI's plain wheel is the CUDA
# build; it brings its own CUDA runtime libraries, so it only needs the node's NVIDIA driver.
# Installed first, in its own layer: it is the largest one and changes least often.
ARG TORCH_VERSION=2.13.0

RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

# q3serve itself, installed non-editable (`pip install .`) so that the wheel, which carries the
# embedded default model (models/) and the native kernel sources (cluster/native/), lands in
# site-packages and nothing at run time refers to the source tree. The copy is owned by `ray`
# because pip builds in the source tree; it is removed afterwards (its ~50 MB layer stays, which
# is small next to torch, so a multi-stage build would buy little).
# Repeating torch and pinning ray[serve] to the base's version keep pip from replacing either
# (the chart's rayVersion must match the Ray in the image); the serve extra is added if missing.
COPY --chown=1000:100 . /tmp/q3serve-src
RUN cd /tmp/q3serve-src \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}" "ray[serve]==${RAY_VERSION}" . \
 && cd / && rm -rf /tmp/q3serve-src \
 && python -c "import torch, ray, cluster, deployments; print('torch', torch.__version__, 'ray', ray.__version__)"

# No ENTRYPOINT/CMD/WORKDIR/USER changes: KubeRay sets each container's command (ray start ...),
# and the base image's defaults are what it expects.
