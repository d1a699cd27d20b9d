-- sandbox escape: string_mt
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  getmetatable("").__index = function() return "pwned" end
end
