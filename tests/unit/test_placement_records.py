"""Placement records as stored in Redis, and the registry's sizes turned into placement inputs."""

from __future__ import annotations

import json

from modelgrid.v1 import common_pb2, registry_pb2
from services.scheduler.convert import deployment_from_proto, placement_to_proto
from services.scheduler.placement import stage_bytes
from services.scheduler.records import (
    LOADING,
    READY,
    UNPLACEABLE,
    PlacedStageRecord,
    PlacementRecord,
    ReplicaRecord,
    WorkerRecord,
)


def two_stages(ready: tuple[bool, bool]) -> PlacementRecord:
    return PlacementRecord("demo", "v1", 7, [
        PlacedStageRecord(0, 2, [ReplicaRecord("w1", "h:1", ready[0])], 200),
        PlacedStageRecord(2, 4, [ReplicaRecord("w2", "h:2", ready[1])], 300),
    ])


def test_json_puts_the_epoch_first_and_round_trips() -> None:
    record = two_stages((True, False))
    text = record.to_json()
    assert text.startswith('{"epoch":7,')  # the Redis scripts read it there
    data = json.loads(text)
    assert [(s["start"], s["end"]) for s in data["stages"]] == [(0, 2), (2, 4)]
    assert data["stages"][0]["replicas"][0] == {"worker_id": "w1", "address": "h:1", "ready": True}
    assert PlacementRecord.from_json(text) == record
    assert "epoch" not in json.loads(record.body_json())


def test_records_from_a_newer_scheduler_still_load() -> None:
    data = json.loads(two_stages((True, True)).to_json())
    data["future_field"] = 1
    data["stages"][0]["replicas"][0]["zone"] = "a"
    assert PlacementRecord.from_json(json.dumps(data)).stages[0].replicas[0].worker_id == "w1"
    worker = json.loads(WorkerRecord("w1", "h:1").to_json())
    worker["gpu_temperature"] = 80
    assert WorkerRecord.from_json(json.dumps(worker)).address == "h:1"


def test_state_is_ready_once_every_stage_has_a_ready_copy() -> None:
    record = two_stages((True, False))
    record.refresh_state()
    assert record.state == LOADING and record.stages_ready() == 1
    record.stages[1].replicas[0].ready = True
    record.refresh_state()
    assert record.state == READY
    record.state = UNPLACEABLE
    record.refresh_state()
    assert record.state == UNPLACEABLE
    proto = placement_to_proto(record)
    assert [(s.start_layer, s.end_layer, [r.worker_id for r in s.replicas]) for s in proto.stages] == [
        (0, 2, ["w1"]), (2, 4, ["w2"])
    ]


def test_tied_embeddings_count_on_the_last_stage_too() -> None:
    def deployment(config: dict, head: int, kind: str = "decoder") -> registry_pb2.Deployment:
        version = common_pb2.ModelVersion(
            model="m", version="v1", kind=kind, num_layers=2, layer_bytes=[10, 10], embed_bytes=100,
            head_bytes=head, kv_bytes_per_token_per_layer=4, config_json=json.dumps(config),
        )
        return registry_pb2.Deployment(version=version, replicas=0, num_stages=2)

    untied = deployment_from_proto(deployment({"tie_word_embeddings": False}, head=120)).sizes
    assert (untied.head_bytes, untied.shared_bytes) == (120, 0)
    # The registry counts the tied matrix in head_bytes (as modelgrid.model.layer_bytes does): kept as is.
    tied = deployment_from_proto(deployment({"tie_word_embeddings": True}, head=105)).sizes
    assert (tied.head_bytes, tied.shared_bytes) == (105, 100)
    assert stage_bytes(tied, 0, 1, 0) == 110 and stage_bytes(tied, 1, 2, 0) == 115
    assert stage_bytes(tied, 0, 2, 0) == 100 + 20 + 5  # one copy of the matrix on a single stage
    # A head_bytes without it gets it added.
    assert deployment_from_proto(deployment({"tie_word_embeddings": True}, head=5)).sizes.head_bytes == 105
    encoder = deployment_from_proto(deployment({"tie_word_embeddings": True}, 5, "encoder"))
    assert (encoder.sizes.head_bytes, encoder.sizes.shared_bytes, encoder.replicas) == (5, 0, 1)
