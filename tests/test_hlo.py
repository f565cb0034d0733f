"""maxgemma.hlo on a hand-written HLO module: sends, their producers, loop trip counts.

Text only: no compiler, no libtpu. tests/test_aot.py checks the same reader on real TPU programs.
"""

from maxgemma import hlo

HLO = """
%cond (p.0: (s32[], f32[4])) -> pred[] {
  %constant.9 = s32[]{:T(128)} constant(28)
  %p.0 = (s32[]{:T(128)}, f32[4]{0}) parameter(0)
  %get-tuple-element.1 = s32[]{:T(128)} get-tuple-element(%p.0), index=0
  ROOT %lt = pred[]{:T(512)} compare(%get-tuple-element.1, %constant.9), direction=LT
}

%body (p.1: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p.1 = (s32[]{:T(128)}, f32[4]{0}) parameter(0)
  %get-tuple-element.2 = f32[4]{0} get-tuple-element(%p.1), index=1
  %after-all.2 = token[] after-all()
  %send.3 = (f32[4]{0}, u32[], token[]) send(%get-tuple-element.2, %after-all.2), channel_id=5, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %tuple = (s32[]{:T(128)}, f32[4]{0}) tuple(%get-tuple-element.1, %get-tuple-element.2)
}

ENTRY %main (param.1: f32[512,64]) -> f32[512,16] {
  %fusion.6 = f32[512,16]{0,1:T(8,128)} fusion(%fusion.121), kind=kCustom, calls=%all-reduce-scatter, backend_config={}
  %bitcast.6 = f32[8,8,128]{2,1,0:T(8,128)} bitcast(%fusion.6)
  %after-all.1 = token[] after-all()
  %send.1 = (f32[8,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%bitcast.6, %after-all.1), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send.2 = (f32[4]{0}, u32[], token[]) send(%after-all.1, %after-all.1), channel_id=4, frontend_attributes={_xla_megascale_transfer_type="ALL_GATHER"}
  %constant.1 = s32[]{:T(128)} constant(1)
  %copy.1 = s32[]{:T(128)} copy(%constant.1)
  %tuple.0 = (s32[]{:T(128)}, f32[4]{0}) tuple(%copy.1, %param.1)
  %while.1 = (s32[]{:T(128)}, f32[4]{0}) while(%tuple.0), condition=%cond, body=%body
}
"""  # noqa: E501


def test_hlo_parser_reads_sends_their_producers_and_loop_counts():
  one, looped = sorted(hlo.dcn_allreduce_sends(HLO), key=lambda s: s["name"])
  assert (one["dtype"], one["shape"], one["elements"]) == ("f32", (8, 8, 128), 8192)
  assert one["source"].name == "fusion.6" and hlo.is_reduce_scatter(one["source"])
  assert one["source"].array == ("f32", (512, 16)) and one["target"] == "{1,2}x{0:3}"
  assert one["per_step"] == 1
  # The send in the loop body runs once per iteration: the counter runs from 1 (first iteration
  # peeled, as the TPU compiler does for the backward scan) while < 28, so 27 times.
  assert (looped["name"], looped["shape"], looped["per_step"]) == ("send.3", (4,), 27)
  assert not hlo.is_reduce_scatter(looped["source"])
  known = 'body=%body, backend_config={"known_trip_count":{"n":"7"}}'
  with_known = HLO.replace("body=%body", known)
  assert max(s["per_step"] for s in hlo.dcn_allreduce_sends(with_known)) == 7


COLLECTIVES = """
%body (p.1: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p.1 = (s32[]{:T(128)}, f32[4]{0}) parameter(0)
  %ar = bf16[64,32]{1,0} all-reduce(%p.1), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, use_global_device_ids=true, to_apply=%add
  ROOT %tuple = (s32[]{:T(128)}, f32[4]{0}) tuple(%p.1, %p.1)
}

%cond (p.0: (s32[], f32[4])) -> pred[] {
  %p.0 = (s32[]{:T(128)}, f32[4]{0}) parameter(0)
  ROOT %lt = pred[]{:T(512)} compare(%p.0, %p.0), direction=LT
}

ENTRY %main (param.1: f32[512,64]) -> f32[512,16] {
  %ag = f32[512,64]{1,0} all-gather(%param.1), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %rs = f32[128,16]{0,1:T(8,128)} fusion(%ag), kind=kCustom, calls=%all-reduce-scatter.3, replica_groups=[2,4]<=[8]
  %a2a = bf16[8,16]{1,0} all-to-all(%rs), channel_id=3, replica_groups=[4,2]<=[8], dimensions={0}
  %cp = (bf16[2,1024]{1,0}, bf16[2,1024]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%a2a), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %tuple.0 = (s32[]{:T(128)}, f32[4]{0}) tuple(%param.1, %param.1)
  %while.1 = (s32[]{:T(128)}, f32[4]{0}) while(%tuple.0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
}
"""  # noqa: E501


def test_slice_collectives_are_counted_as_ring_traffic_per_chip():
  got = {c["name"]: c for c in hlo.ici_collectives(COLLECTIVES)}
  assert sorted(got) == ["a2a", "ag", "ar", "cp", "rs"]
  assert {n: c["group"] for n, c in got.items()} == {"ag": 4, "rs": 4, "a2a": 2, "ar": 4, "cp": 1}
  assert got["ag"]["sent_bytes"] == 512 * 64 * 4 * 3 // 4  # receives the other 3/4 of its result
  assert got["rs"]["kind"] == "reduce-scatter"
  assert got["rs"]["sent_bytes"] == 128 * 16 * 4 * 3  # its shard of 4: 3 shards' worth out
  assert got["a2a"]["sent_bytes"] == 8 * 16 * 2 // 2
  assert got["cp"]["sent_bytes"] == 2 * 1024 * 2  # one buffer, not the start's whole tuple
  # Twice (n-1)/n of the buffer per run, 6 runs of the loop body.
  assert (got["ar"]["per_step"], got["ar"]["sent_bytes"]) == (6, 64 * 32 * 2 * 2 * 3 // 4 * 6)
