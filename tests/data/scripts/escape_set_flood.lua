-- sandbox escape: set_flood
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local v = ("x"):rep(100000)
  for i = 1, 1e6 do msg:set("ZZZ-1", v .. i) end
end
