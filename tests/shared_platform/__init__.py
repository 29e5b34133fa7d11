"""Test files that share one deployed platform (conftest.py); the corpus it ingests."""

CHAT, EMB = "tiny-chat", "all-minilm-l6-v2"
DOCS = {
    "ray-serve.md": "# Ray Serve\n\nRay Serve is a scalable model serving library. It hosts the ORFEAS gateway "
                    "and scales replicas with an autoscaling policy.\n",
    "qdrant.md": "# Qdrant\n\nQdrant stores dense and sparse vectors. ORFEAS uses Qdrant Edge as the embedded "
                 "vector store, with BM25 sparse vectors and hybrid fusion.\n",
    "kuberay.md": "# KubeRay\n\nKubeRay runs Ray clusters on Kubernetes. A RayService deploys the Serve "
                  "applications and upgrades them without downtime.\n",
}
