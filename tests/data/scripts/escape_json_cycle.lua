-- sandbox escape: json_cycle
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local t = {}
  t.self = t
  ctx:route("out", json.encode(t))
end
