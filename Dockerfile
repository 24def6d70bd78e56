# One image for the API, the workers and the prestart step; the command picks the role.
# TORCH_SPEC chooses the torch build: the CPU wheel by default; for GPU workers build with
#   --build-arg TORCH_SPEC="torch==2.13.0" --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY pyproject.toml README.md alembic.ini ./
COPY fedsrd_core fedsrd_core
COPY api api
COPY workers workers
COPY agent agent
COPY migrations migrations
RUN pip install .
# Named volumes mounted on /data take this ownership on first use.
RUN useradd --create-home fedsrd && mkdir -p /data /models && chown fedsrd /data /models
USER fedsrd
EXPOSE 8000
CMD ["uvicorn", "--factory", "api.main:app_from_env", "--host", "0.0.0.0", "--port", "8000"]
