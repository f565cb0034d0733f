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
