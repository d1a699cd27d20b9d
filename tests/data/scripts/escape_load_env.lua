-- sandbox escape: load_env
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  -- text chunks load, with the env given; that is allowed and harmless
  local f = assert(load("return x", "chunk", "t", { x = 7 }))
  if f() ~= 7 then error("env not kept") end
  local g = assert(load("return _ENV", "chunk", "bt", nil))
  if g() ~= nil then error("nil env not kept") end
  ctx:route("out", "ok")
end
