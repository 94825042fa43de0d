// The model card's JavaScript example, as written: only the base URL and the key come from
// the environment. Run from a directory holding source.png; prints the response as JSON.
import OpenAI, { toFile } from "openai";
import fs from "fs";

const client = new OpenAI({
  baseURL: process.env.GATEWAY_URL,
  apiKey: process.env.GATEWAY_API_KEY,
});

const result = await client.images.edit({
  model: "recraft-crisp-upscale",
  image: fs.createReadStream("source.png"),
  prompt: "Upscale this image",
  size: "1024x1024",
});

console.log(JSON.stringify(result));
