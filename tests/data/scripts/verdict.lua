function on_message(msg, ctx)
  local what = ctx.message_id
  if what == "filter" then
    ctx:route("early", msg)
    ctx:filter("test message")
    return
  elseif what == "reject" then
    ctx:reject("unsupported: " .. msg:type())
    return
  elseif what == "route_after_filter" then
    ctx:filter("x")
    ctx:route("late", msg) -- line 12: an error
  elseif what == "log" then
    ctx:log("debug", "d", 1)
    ctx:log("info", "i", nil, 2.5)
    ctx:log("warn", "w")
    ctx:log("error", "e")
    print("p", "q")
    return
  elseif what == "badlevel" then
    ctx:log("loud", "x")
  elseif what == "snapshot" then
    msg:set("PID-5.1", "FIRST")
    ctx:route("a", msg)
    msg:set("PID-5.1", "SECOND")
    ctx:route("b", msg)
    ctx:route("c", "plain text")
    ctx:route("d", { id = msg:get("MSH-10"), list = { 1, 2 } })
    return
  elseif what == "error_object" then
    error({ code = 1 })
  elseif what == "error_level0" then
    error("no position", 0)
  end
  ctx:route("default", msg)
end
